import subprocess
import sys


def test_selfcheck_command_on_two_processes():
    out = subprocess.run([sys.executable, "-m", "tpserve.cli", "selfcheck", "--tp", "2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TP=2 (gloo)" in out.stdout
    assert out.stdout.count(" yes") == 4 and "all layers match" in out.stdout


def test_bad_tp_is_a_one_line_error():
    out = subprocess.run([sys.executable, "-m", "tpserve.cli", "selfcheck", "--tp", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--tp: must be >= 1" in out.stderr and "Traceback" not in out.stderr


def test_inspect_shows_size_and_sharding():
    from tpserve.checkpoint.default_model import default_model_path

    out = subprocess.run([sys.executable, "-m", "tpserve", "inspect", str(default_model_path()), "--tp", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LlamaForCausalLM" in out.stdout and "134,515,008" in out.stdout and "float32" in out.stdout
    assert "9 query heads, 3 KV heads" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit() and "-" in line]
    assert [r[1] for r in rows] == ["0-2", "3-4", "5-6", "7-8"]  # query heads 3,2,2,2
    assert [r[2] for r in rows] == ["0-0", "1-1", "1-2", "2-2"]  # KV head 1 held by ranks 1 and 2
    bad = subprocess.run([sys.executable, "-m", "tpserve", "inspect", str(default_model_path()), "--tp", "10"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--tp 10 is larger than the model's 9 attention heads" in bad.stderr


def test_inspect_counts_a_4bit_checkpoints_weights_not_its_bytes():
    """Two 4-bit weights a byte, and the groups' scales and mins are not weights of their own."""
    from tpserve.checkpoint.default_model import default_model_path

    out = subprocess.run([sys.executable, "-m", "tpserve", "inspect", str(default_model_path(keep_q4=True))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "134,515,008" in out.stdout and "quantization:  q4" in out.stdout
