"""Child process of the benchmark: ``python -m bench._memory MODEL MODE BATCH HxW DTYPE DEVICE [LIMIT_BYTES]``.

Prints {"peak_bytes": n, "step_s": seconds}, or {"error": "out of memory"} (exit status 3) when the step
does not fit in LIMIT_BYTES more address space (or the device's memory)."""
import json
import sys
import time

from .core import DTYPES, _is_oom, measure_memory_here, parse_size

if __name__ == "__main__":
    name, mode, batch, size, dtype, device = sys.argv[1:7]
    limit = int(sys.argv[7]) if len(sys.argv) > 7 else None
    h, w = parse_size(size)
    t0 = time.perf_counter()
    try:
        peak = measure_memory_here(name, mode, int(batch), h, w, DTYPES[dtype], device, limit)
    except (RuntimeError, MemoryError) as e:
        if not _is_oom(e):
            raise
        print(json.dumps({"error": "out of memory", "detail": str(e).splitlines()[0][:200]}), flush=True)
        sys.exit(3)
    print(json.dumps({"peak_bytes": peak, "step_s": time.perf_counter() - t0}))
