"""Child process of the benchmark: ``python -m bench._memory MODEL MODE BATCH HxW DTYPE DEVICE``."""
import json
import sys

from .core import DTYPES, measure_memory_here, parse_size

if __name__ == "__main__":
    name, mode, batch, size, dtype, device = sys.argv[1:7]
    h, w = parse_size(size)
    peak = measure_memory_here(name, mode, int(batch), h, w, DTYPES[dtype], device)
    print(json.dumps({"peak_bytes": peak}))
