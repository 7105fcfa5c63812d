# The two commands of the README: `make test` and `make bench` each do all the set-up first.
PY ?= python3

# The set-up runs again only when one of its inputs changes or the stamp is missing. Build-time
# variables (FAST_UNET_SKIP_EXT, TORCH_CUDA_ARCH_LIST, ...) are not inputs: after changing one,
# `rm -f build/.installed` (or `make -B install`) to rebuild.
STAMP := build/.installed
INSTALL_INPUTS := requirements.txt setup.py pyproject.toml $(shell find csrc -type f)

.PHONY: install test test-eager test-interpret test-cpu-isa compile-report compile-report-full ptxas-report bench
install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	@echo "installing requirements..."
	$(PY) -m pip install -q -r requirements.txt
	@echo "building the extension fast_unet._C (make install took 2 min 21 s on 2 idle cores)..."
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p $(@D)
	@touch $@

# `make test` runs every stage, even after one fails, and ends with one line per stage (scripts/test_stages.sh);
# it fails when any stage failed.
# Each pytest run ends with one line of its skips counted per reason (tests/conftest.py; -rs lists them).
# 1. the main suite (eager, extension, dispatch, benchmark smoke; tests/ops on eager and ext); tests/interpret
#    and the triton params of tests/ops skip themselves here; two pytest-xdist workers of one torch thread each
#    (most of its tests are small shapes and subprocesses that one process leaves a core idle on)
# 2. the Triton kernels on CPU tensors through Triton's interpreter (its own process: triton.jit
#    reads TRITON_INTERPRET at import): tests/interpret, and tests/ops' triton params only (-m triton);
#    the interpreter is single-threaded Python, so two pytest-xdist workers, one torch thread each; worksteal:
#    an idle worker takes queued tests from the busy one (the slow model tests otherwise pile up on one)
# 3. the model's parity tests again with PyTorch's CPU kernels as other processors pick them: AVX2 (as on
#    an AMD EPYC without AVX-512) and no vector ISA (oneDNN's and ATen's dispatch capped by environment)
# 4. every Triton kernel compiled ahead of time for sm_80 and sm_90, CI's set (fast_unet/aot.py ci_builds):
#    fails on a compile error or a spill; `make compile-report-full` compiles every build
# 5. every CUDA kernel of csrc/ through ptxas -v for sm_80 and sm_90: fails on a spill (needs nvcc)
test: install
	@bash scripts/test_stages.sh

test-eager:
	@echo "stage 1/5: main suite (tests/interpret and the triton tests of tests/ops are skipped here, they run in stage 2 under the Triton interpreter)"
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests

test-interpret:
	@echo "stage 2/5: the Triton kernels on CPU tensors under the Triton interpreter (tests/interpret, tests/ops -m triton)"
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests/interpret tests/ops -m triton

# The float32 parity tests, whose outcome must not depend on how PyTorch's CPU convolutions and GEMMs round
# (the ISA oneDNN and ATen pick; the lazy-path tests at batch 1), and two of the interpreter's model tests with an
# attention block it cannot take (the first and the last). Not the bf16/fp16 tests: their yardstick is
# PyTorch's own error in that dtype on the machine that runs them.
ISA_TESTS := tests/test_model.py -k "(falling_back or gradients or (lazy_path and 1-)) and not low_precision"
test-cpu-isa:
	@echo "stage 3/5: the model's parity tests with the CPU kernels of an AVX2 machine and of a machine without vector ISA"
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q $(ISA_TESTS)
	ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 $(PY) -m pytest -q $(ISA_TESTS)
	TRITON_INTERPRET=1 OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -n 2 tests/interpret/test_model.py -k "cannot_take and (sa1-1 or sa6-2)"

compile-report:
	@echo "stage 4/5: every Triton kernel compiled ahead of time for sm_80 and sm_90, one build per kernel, dtype kind, tile and body (fails on a compile error or a spill)"
	env -u TRITON_INTERPRET $(PY) -m fast_unet.info --compile sm_80,sm_90 --ci --no-loops > compile_report.txt
	tail -n 1 compile_report.txt

# Every build (every variant of every config: alignment, split, tf32, ints at 1, float16 beside bfloat16) with
# the SASS of its inner loop; writes docs/compile_report.json, which stage 1 checks is current for kernels/.
# Run it after changing a kernel (cold: about an hour on 2 cores; Triton's cache keeps unchanged kernels cheap).
compile-report-full:
	env -u TRITON_INTERPRET $(PY) -m fast_unet.info --compile sm_80,sm_90 --record docs/compile_report.json > compile_report_full.txt
	tail -n 1 compile_report_full.txt

ptxas-report:
	@echo "stage 5/5: every CUDA kernel of csrc/ through ptxas -v for sm_80 and sm_90 (fails on a spill)"
	@if command -v nvcc >/dev/null; then bash scripts/ptxas_report.sh "80 90"; else echo "ptxas-report: no nvcc, skipped"; fi

bench: install
	$(PY) -m bench
