# attn.c - build, run, test.
#   make            build ./run (-O3 -march=native; threads: parallel.c, a pthread pool)
#   make test       C unit tests + end-to-end tests against the reference outputs
#   make PORTABLE=1 build without -march=native: the portable C kernels instead of AVX-512 / AVX2
#   make BLAS=1     f32 prefill products through OpenBLAS's cblas_sgemm (Debian: libopenblas-dev). OpenBLAS
#                   0.3.21 takes CPUs it does not know for a Prescott (SSE3): OPENBLAS_CORETYPE=SKYLAKEX
#   make KERNELS=portable   the portable C kernels, but the rest still built for this CPU (for the tests)
#   make bench      decode / prefill speed against the machine's measured bandwidth and FMA peak (bench/)

CC ?= cc
# link-time optimisation where the compiler has it: inlines the SIMD dot product into attention.c
LTO ?= $(shell echo 'int main(void){return 0;}' | $(CC) -flto=auto -x c - -o /dev/null 2>/dev/null && echo -flto=auto)
CFLAGS ?= -O3 $(LTO)
WARN = -Wall -Wextra -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
ifeq ($(PORTABLE),1)
  ARCH ?=
else
  ARCH ?= -march=native
endif
LDLIBS = -lm -lpthread
ifeq ($(KERNELS),portable)
  KERNEL_FLAGS = -DATTN_PORTABLE_KERNELS
endif
ifeq ($(BLAS),1)
  BLAS_CFLAGS ?= -DUSE_BLAS $(shell pkg-config --cflags openblas 2>/dev/null)
  BLAS_LIBS ?= $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas)
endif

# the Python 3 that has numpy (export.py and the tests need it)
PYTHON ?= $(shell for p in python3 /usr/bin/python3 python; do $$p -c 'import numpy' 2>/dev/null && echo $$p && break; done)

ENGINE = model.c attention.c kvcache.c tokenizer.c ops.c matmul.c parallel.c unicode.c unicode_tables.c
HEADERS = model.h attention.h kvcache.h tokenizer.h ops.h unicode.h
COMPILE = $(CC) $(CFLAGS) $(ARCH) $(WARN) $(KERNEL_FLAGS) $(BLAS_CFLAGS)

run: run.c $(ENGINE) $(HEADERS)
	$(COMPILE) -o $@ run.c $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

tests/unit: tests/unit.c $(ENGINE) $(HEADERS)
	$(COMPILE) -I. -o $@ tests/unit.c $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

# other builds of ./run for the equivalence tests and the benchmark, e.g. make build/portable/run PORTABLE=1
build/%/run: run.c $(ENGINE) $(HEADERS)
	@mkdir -p $(dir $@)
	$(COMPILE) -o $@ run.c $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

.PHONY: all test bench clean
all: run

test: run tests/unit
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (Debian: apt-get install python3-numpy)"; exit 1; }
	$(PYTHON) tests/run_tests.py

bench: run
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (Debian: apt-get install python3-numpy)"; exit 1; }
	$(PYTHON) bench/bench.py

clean:
	rm -f run tests/unit
	rm -rf build
