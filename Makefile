# The two commands of the README: `make test` and `make bench` each do all the set-up first.
PY ?= python3

.PHONY: install test test-eager test-interpret compile-report ptxas-report bench
install:
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

# 1. the main suite (eager, extension, dispatch, benchmark smoke); tests/interpret skips itself here
# 2. the Triton kernels on CPU tensors through Triton's interpreter (its own process: triton.jit
#    reads TRITON_INTERPRET at import)
# 3. every Triton kernel compiled ahead of time for sm_80 and sm_90: fails on a compile error or a spill
# 4. every CUDA kernel of csrc/ through ptxas -v for sm_80 and sm_90: fails on a spill (needs nvcc)
test: install
	$(MAKE) test-eager test-interpret compile-report ptxas-report

test-eager:
	$(PY) -m pytest -q tests

test-interpret:
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/interpret

compile-report:
	env -u TRITON_INTERPRET $(PY) -m fast_unet.info --compile sm_80,sm_90 > compile_report.txt
	tail -n 1 compile_report.txt

ptxas-report:
	@if command -v nvcc >/dev/null; then bash scripts/ptxas_report.sh "80 90"; else echo "ptxas-report: no nvcc, skipped"; fi

bench: install
	$(PY) -m bench
