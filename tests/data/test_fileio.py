"""Files pccfast writes: atomic, and readable by other accounts as an ordinary open() makes them."""
import errno
import os

import pytest

from pccfast.data import fileio
from pccfast.data.fileio import check_writable


WRITE = """
import os, stat, sys
import numpy as np
from pccfast.data import fileio
d = sys.argv[1]
fileio.atomic_write_bytes(os.path.join(d, "a.json"), b"{}")
fileio.save_image(os.path.join(d, "i.jpg"), np.zeros((8, 8, 3), np.uint8))
fileio.save_mask_png(os.path.join(d, "m.png"), np.zeros((8, 8), np.uint8), [0] * 768)
fileio.atomic_link_or_copy(os.path.join(d, "a.json"), os.path.join(d, "sub", "b.json"))
open(os.path.join(d, "plain"), "w").close()
print(" ".join(oct(stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode)) for n in ("plain", "a.json", "i.jpg", "m.png", "sub/b.json")))
"""


@pytest.mark.parametrize("umask, mode", [("022", "0o644"), ("002", "0o664"), ("077", "0o600")])
def test_atomic_files_get_the_umask_mode(tmp_path, umask, mode):
    """Regression: every atomically written file was 0600 (the temporary file's mode), so a
    training job under another account could not read the dataset on shared storage. Each
    file now has the mode an ordinary open() gives under the process's umask."""
    import subprocess
    import sys

    res = subprocess.run(["sh", "-c", f'umask {umask} && exec "$0" -c "$1" "$2"', sys.executable, WRITE, str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [mode] * 5


def test_check_writable_one_line(tmp_path, monkeypatch):
    check_writable(str(tmp_path / "new" / "dir"))
    assert (tmp_path / "new" / "dir").is_dir() and not os.listdir(tmp_path / "new" / "dir")
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError) as info:
        check_writable(str(tmp_path / "f" / "x"))
    assert info.value.filename == str(tmp_path / "f" / "x")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", full)
    with pytest.raises(OSError, match="cannot write files here: No space left on device"):
        check_writable(str(tmp_path))
