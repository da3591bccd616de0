"""Files written whole: through a temporary file and a rename, so that a reader, a crash or a
kill never sees half a file.

    write_atomic(path, text)
    write_json(path, obj)
"""

import errno
import json
import os


def write_atomic(path, text):
    """Write text (UTF-8) through a temporary file and a rename: a reader, or a crash, never leaves
    half a file.

    The temporary name holds the pid, so two processes writing the same file never share (and
    clobber) one; a failed write removes its temporary, and a full disk is said as such, with the
    path (a bare ENOSPC names no file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC,
                          f"disk full (No space left on device) while writing {path}; the previous "
                          "file, if any, is unchanged: free some space and run again") from None
        raise


def write_json(path, obj):
    """JSON written whole (write_atomic): readers never see half an object."""
    write_atomic(path, json.dumps(obj, indent=2))
