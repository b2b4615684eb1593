"""uvicorn with a database statement counter, for bench/sse_fanout.py: every statement any engine
of this process runs is counted, and the count is written to COUNT_FILE every 0.2 s.

    python bench/counted_api.py COUNT_FILE api.main:app --host ... --port ...   (uvicorn's own arguments)
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

from sqlalchemy import Engine, event

count = 0


@event.listens_for(Engine, "before_cursor_execute")
def _count(*_args) -> None:  # noqa: ANN002
    global count
    count += 1


def _write(path: Path) -> None:
    while True:
        path.write_text(str(count))
        time.sleep(0.2)


if __name__ == "__main__":
    threading.Thread(target=_write, args=(Path(sys.argv[1]),), daemon=True).start()
    import uvicorn

    sys.argv = ["uvicorn", *sys.argv[2:]]
    uvicorn.main()
