# attn.c - build, run, test.
#   make            build ./run (-O3 -march=native, OpenMP when the compiler has it)
#   make test       C unit tests + end-to-end tests against the reference outputs
#   make PORTABLE=1 build without -march=native

CC ?= cc
CFLAGS ?= -O3
WARN = -Wall -Wextra -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
ifeq ($(PORTABLE),1)
  ARCH =
else
  ARCH = -march=native
endif
OPENMP ?= $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo -fopenmp)
LDLIBS = -lm

# the Python 3 that has numpy (export.py and the tests need it)
PYTHON ?= $(shell for p in python3 /usr/bin/python3 python; do $$p -c 'import numpy' 2>/dev/null && echo $$p && break; done)

ENGINE = model.c attention.c kvcache.c tokenizer.c ops.c unicode.c unicode_tables.c study.c png.c
HEADERS = model.h attention.h kvcache.h tokenizer.h ops.h unicode.h study.h png.h

run: run.c $(ENGINE) $(HEADERS)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) $(OPENMP) -o $@ run.c $(ENGINE) $(LDLIBS)

tests/unit: tests/unit.c $(ENGINE) $(HEADERS)
	$(CC) $(CFLAGS) $(ARCH) $(WARN) $(OPENMP) -I. -o $@ tests/unit.c $(ENGINE) $(LDLIBS)

.PHONY: all test clean
all: run

test: run tests/unit
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (Debian: apt-get install python3-numpy)"; exit 1; }
	$(PYTHON) tests/run_tests.py

clean:
	rm -f run tests/unit
	rm -rf build
