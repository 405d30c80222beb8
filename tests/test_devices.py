"""Device options: MirroredStrategy over two logical CPU devices, and mixed precision.

Both in one run in a fresh interpreter (logical devices must be configured before TensorFlow starts,
and the precision policy is process-global): mixed precision over two replicas, the usual multi-GPU
setting, costs one tiny run instead of two.
"""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, "tests")
    from conftest import tiny_values
    from dsal_tf.active import run_active_learning
    from dsal_tf.config import resolve
    from dsal_tf.train import get_distribution
    import keras
    from pathlib import Path
    values = tiny_values(sys.argv[1], Path(sys.argv[2]), nb_iterations=1, depth=3, **json.loads(sys.argv[3]))
    cfg = resolve(values)
    strategy = get_distribution(cfg)
    run = run_active_learning(cfg, log=print)
    model = keras.models.load_model(run / "round_01" / "best.keras", compile=False)
    print("RESULT", json.dumps({"replicas": strategy.num_replicas_in_sync,
                                "policy": keras.mixed_precision.global_policy().name,
                                "main_dtype": str(model.get_layer("main").dtype_policy.compute_dtype),
                                "done": (run / "round_01" / "DONE").is_file()}))
""")


def run_script(tiny_data, tmp_path, **overrides) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_data), str(tmp_path), json.dumps(overrides)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="session")  # session: built once per (xdist) process
def mirrored_mixed(tiny_data, tmp_path_factory):
    return run_script(tiny_data, tmp_path_factory.mktemp("devices"), distribute="mirrored", mixed_precision=True)


def test_mirrored_strategy_on_two_logical_cpus(mirrored_mixed):
    assert mirrored_mixed["replicas"] == 2 and mirrored_mixed["done"]


def test_mixed_precision_keeps_float32_heads(mirrored_mixed):
    result = mirrored_mixed
    assert result["policy"] == "mixed_float16" and result["main_dtype"] == "float32" and result["done"]
