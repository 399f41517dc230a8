"""Peak memory of converting and loading the full-size SD3.5-Medium transformer (slow).

A random bf16 checkpoint with diffusers' key names and shapes (tools/random_checkpoint.py,
4.9 GB in one file) is converted, then loaded in bf16, each in its own process whose peak RSS
is measured: the converter must stay within the largest source file + 1.5 GB, the loader within
the weights in the target dtype + 1.5 GB. Needs about 10 GB of disk under pytest's tmp_path.
"""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLACK_BYTES = 1.5e9

# Runs the command as its only child, then prints that child's peak RSS (ru_maxrss is in KiB).
PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024; "
            "print('peak_rss_bytes', peak); sys.exit(code)")

# Loads the converted transformer in bf16, checks one weight against the source, prints the
# weights' size.
LOAD = """
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from flowgrpo_jax.convert.safetensors_io import SafetensorsFolder
from flowgrpo_jax.families.sd3.loading import load_transformer
model = load_transformer(sys.argv[1], dtype=jnp.bfloat16)
params = jax.block_until_ready(jax.tree.leaves(nnx.state(model, nnx.Param)))
source = SafetensorsFolder(sys.argv[2])["transformer_blocks.3.attn.to_q.weight"]
kernel = model.transformer_blocks[3].attn.to_q.kernel.get_value()
assert kernel.dtype == jnp.bfloat16
np.testing.assert_array_equal(np.asarray(kernel), source.T)
print("weights_bytes", sum(p.nbytes for p in params))
"""


def measured(*command) -> tuple[int, float, dict]:
    """(peak RSS in bytes, wall seconds, {name: value} of the 'name value' lines printed)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                            text=True, timeout=1800)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    printed = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    return int(printed["peak_rss_bytes"]), seconds, printed


@pytest.mark.slow
def test_full_size_transformer_converts_and_loads_within_memory_targets(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_rss, make_s, _ = measured(sys.executable, "tools/random_checkpoint.py", "--component",
                            "transformer", "--config", "flowgrpo_jax/families/sd3/sd35m/transformer.json",
                            "--dst", str(src), "--dtype", "bfloat16")
    largest_file = max(os.path.getsize(src / n) for n in os.listdir(src)
                       if n.endswith(".safetensors"))
    convert_rss, convert_s, _ = measured(sys.executable, "tools/convert_weights.py",
                                         "--src", str(src), "--dst", str(dst))
    load_rss, load_s, printed = measured(sys.executable, "-c", LOAD, str(dst), str(src))
    weights = int(printed["weights_bytes"])
    report = (f"random checkpoint written in {make_s:.0f} s, peak RSS {make_rss / 1e9:.2f} GB; "
              f"largest source file "
              f"{largest_file / 1e9:.2f} GB; converter peak RSS {convert_rss / 1e9:.2f} GB in "
              f"{convert_s:.0f} s; bf16 weights {weights / 1e9:.2f} GB; loader peak RSS "
              f"{load_rss / 1e9:.2f} GB in {load_s:.0f} s")
    print(report)
    assert convert_rss <= largest_file + SLACK_BYTES, report
    assert load_rss <= weights + SLACK_BYTES, report
