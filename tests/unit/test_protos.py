import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_matches_protos():
    """Fails with "Protos changed" when protos/ was edited without `make protos`."""
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
