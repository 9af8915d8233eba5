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
