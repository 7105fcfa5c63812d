# The two commands of the README: `make test` and `make bench` each do all the set-up first.
PY ?= python3

# The set-up runs again only when one of its inputs changes or the stamp is missing. Build-time
# variables (FAST_UNET_SKIP_EXT, TORCH_CUDA_ARCH_LIST, ...) are not inputs: after changing one,
# `rm -f build/.installed` (or `make -B install`) to rebuild.
STAMP := build/.installed
INSTALL_INPUTS := requirements.txt setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: install test test-eager test-interpret compile-report ptxas-report bench
install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	@echo "installing requirements..."
	$(PY) -m pip install -q -r requirements.txt
	@echo "building the extension fast_unet._C (about 2 minutes on 2 cores)..."
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p $(@D)
	@touch $@

# 1. the main suite (eager, extension, dispatch, benchmark smoke; tests/ops on eager and ext); tests/interpret
#    and the triton params of tests/ops skip themselves here
# 2. the Triton kernels on CPU tensors through Triton's interpreter (its own process: triton.jit
#    reads TRITON_INTERPRET at import): tests/interpret, and tests/ops' triton params only (-m triton)
# 3. every Triton kernel compiled ahead of time for sm_80 and sm_90: fails on a compile error or a spill
# 4. every CUDA kernel of csrc/ through ptxas -v for sm_80 and sm_90: fails on a spill (needs nvcc)
test: install
	$(MAKE) --no-print-directory test-eager test-interpret compile-report ptxas-report

test-eager:
	@echo "stage 1/4: main suite (tests/interpret and the triton tests of tests/ops are skipped here, they run in stage 2 under the Triton interpreter)"
	$(PY) -m pytest -q tests

test-interpret:
	@echo "stage 2/4: the Triton kernels on CPU tensors under the Triton interpreter (tests/interpret, tests/ops -m triton)"
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/interpret tests/ops -m triton

compile-report:
	@echo "stage 3/4: every Triton kernel compiled ahead of time for sm_80 and sm_90 (fails on a compile error or a spill)"
	env -u TRITON_INTERPRET $(PY) -m fast_unet.info --compile sm_80,sm_90 > compile_report.txt
	tail -n 1 compile_report.txt

ptxas-report:
	@echo "stage 4/4: every CUDA kernel of csrc/ through ptxas -v for sm_80 and sm_90 (fails on a spill)"
	@if command -v nvcc >/dev/null; then bash scripts/ptxas_report.sh "80 90"; else echo "ptxas-report: no nvcc, skipped"; fi

bench: install
	$(PY) -m bench
