"""README.md against the code: its usage example runs as written, and every --flag it names exists."""

import os
import re

from PIL import Image

import finetune_vqa
import pretrain
import train_utils as tu
from data import demo_tokenizer
from model import BridgeTower, BridgeTowerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def test_readme_usage_snippet_runs(tmp_path, capsys):
    # README's "Using a released checkpoint" code, as written, on a checkpoint of the same layout (an HF directory
    # with the MLM and ITM heads and the tokenizer files) and a JPEG of our own
    section = README[README.index("## Using a released checkpoint"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    checkpoint, image = str(tmp_path / "bridgetower-base-itm-mlm"), str(tmp_path / "cats.jpg")
    tokenizer = demo_tokenizer(cache_dir=checkpoint)  # vocab.json + merges.txt next to the weights
    config = BridgeTowerConfig.preset("tiny", vocab_size=tokenizer.vocab_size, heads=("mlm", "itm"))
    BridgeTower(config).save_pretrained(checkpoint)
    Image.new("RGB", (80, 60), (200, 120, 40)).save(image)
    assert code.count('"bridgetower-base-itm-mlm"') == 1 and code.count('"cats.jpg"') == 1
    code = code.replace('"bridgetower-base-itm-mlm"', repr(checkpoint)).replace('"cats.jpg"', repr(image))
    *body, last = code.strip().splitlines()
    scope = {}
    exec("\n".join(body), scope)
    probability = eval(last, scope)
    assert "loaded" in capsys.readouterr().out
    assert probability.shape == (1,) and 0 < probability.item() < 1
    out = scope["out"]
    assert out.mlm_logits.shape[:2] == scope["text"]["input_ids"].shape and out.pooler_output.shape == (1, 256)


def test_every_flag_the_readme_names_exists():
    # the training scripts' settings, the command-line options of the other tools, and those of programs not ours
    settings = set(tu._config_keys(vars(pretrain))) | set(tu._config_keys(vars(finetune_vqa)))
    options = {name for f in ("bridge_kernels.py", "data.py", "bench.py")
               for name in re.findall(r'add_argument\("--([\w-]+)"', open(os.path.join(ROOT, f)).read())}
    others = {"help", "nproc_per_node", "index-url", "local-dir", "shm-size", "key"}  # --help, torchrun's, pip's,
    # hf's, docker's, and "--key=value" itself
    named = set(re.findall(r"(?<![\w-])--([a-zA-Z][\w-]*)", README))
    assert {"eval_only", "bench_profile", "compile-check", "nproc_per_node"} <= named  # the pattern finds them
    assert named - settings - options - others == set()
