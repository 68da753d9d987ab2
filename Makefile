# attn.c - build, run, test.
#   make            build ./run (-O3 -march=native; threads: parallel.c, a pthread pool)
#   make test       C unit tests + end-to-end tests against the reference outputs
#   make PORTABLE=1 build without -march=native: the portable C kernels instead of AVX-512 / AVX2
#   make BLAS=1     f32 prefill products through OpenBLAS's cblas_sgemm (Debian: libopenblas-dev). OpenBLAS
#                   0.3.21 takes CPUs it does not know for a Prescott (SSE3): OPENBLAS_CORETYPE=SKYLAKEX
#   make KERNELS=portable   the portable C kernels, but the rest still built for this CPU (for the tests)
#   make bench      decode / prefill speed against the machine's measured bandwidth and FMA peak (bench/), a
#                   mixture of experts against the roofline of the bytes it reads (bench/moe.py), the
#                   --explore page of 1,024 tokens: size, time to write, time to open in chromium, and
#                   N samples decoding together against one sequence (bench/samples.py)
#   make asan       the whole test suite against ./run and the unit tests built with ASan + UBSan
#   make valgrind   one generation with the default model under valgrind memcheck: no leaks, no errors
#   make fuzz       the libFuzzer targets (clang) for FUZZ_SECONDS each: the loader, the tokenizer, the chat
#                   template interpreter
#   --explore's page (explore/page.html) is compiled in: build/explore_page.h, made by explore/embed.sh (sh + awk)

.DEFAULT_GOAL := all
CC ?= cc
# link-time optimisation where the compiler has it: inlines the SIMD dot product into attention.c
LTO ?= $(shell echo 'int main(void){return 0;}' | $(CC) -flto=auto -x c - -o /dev/null 2>/dev/null && echo -flto=auto)
CFLAGS ?= -O3 $(LTO)
WARN = -Wall -Wextra -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE
ifeq ($(PORTABLE),1)
  ARCH ?=
else
# 512-bit vectors where the loops vectorise by themselves (GCC keeps to 256 on Intel by default): each lane
# does the same operations, so the same bits; 110M prefill: the SiLU -35%, the softmax over scores faster
  ARCH ?= -march=native -mprefer-vector-width=512
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

# the library: loading, the model, the kernels, the tokenizer, chat templates, samplers, the study tools (none
# of it exits the process)
ENGINE = model.c blocks.c mla.c moe.c recurrent.c ssm.c deltanet.c rwkv.c attention.c kvcache.c tokenizer.c regex.c ops.c \
         matmul.c parallel.c unicode.c unicode_tables.c study.c png.c explore.c specials.c chat.c sample.c profile.c
# the command line around it: options, checked inputs and outputs, one-line errors (files.c: ./run's own),
# many sequences (batch.c)
CLI = run.c batch.c files.c
HEADERS = model.h blocks.h recurrent.h tensors.def attention.h kvcache.h batch.h tokenizer.h regex.h ops.h unicode.h \
          study.h png.h explore.h build/explore_page.h specials.h files.h chat.h sample.h profile.h
COMPILE = $(CC) $(CFLAGS) $(ARCH) $(WARN) $(KERNEL_FLAGS) $(BLAS_CFLAGS)

# the page ./run --explore writes, as C string literals: ./run carries it and works from any directory
build/explore_page.h: explore/page.html explore/embed.sh
	@mkdir -p build
	sh explore/embed.sh explore/page.html > $@.tmp && mv $@.tmp $@

run: $(CLI) $(ENGINE) $(HEADERS)
	$(COMPILE) -o $@ $(CLI) $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

tests/unit: tests/unit.c $(ENGINE) $(HEADERS)
	$(COMPILE) -I. -o $@ tests/unit.c $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

# the tokenizer benchmark (bench/bench.py builds it)
build/bench/tokenize: bench/tokenize.c $(ENGINE) $(HEADERS)
	@mkdir -p build/bench
	$(COMPILE) -I. -o $@ bench/tokenize.c $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

# other builds of ./run for the equivalence tests and the benchmark, e.g. make build/portable/run PORTABLE=1
build/%/run: $(CLI) $(ENGINE) $(HEADERS)
	@mkdir -p $(dir $@)
	$(COMPILE) -o $@ $(CLI) $(ENGINE) $(LDLIBS) $(BLAS_LIBS)

.PHONY: all test bench clean asan valgrind fuzz fuzz-seeds
all: run

test: run tests/unit
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (Debian: apt-get install python3-numpy)"; exit 1; }
	$(PYTHON) tests/run_tests.py

bench: run
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (Debian: apt-get install python3-numpy)"; exit 1; }
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/moe.py
	$(PYTHON) bench/samples.py

# --- hostile inputs: sanitizers, valgrind, fuzzing --------------------------------------------------------
# make asan: the tests run ./run and the unit tests through $$ATTN_RUN / $$ATTN_UNIT. A sanitizer report
# ends the process with status 86 (ASan, LeakSanitizer) or 87 (UBSan), which no test accepts.
SANITIZE = -O2 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all
SANITIZER_ENV = ASAN_OPTIONS=exitcode=86:detect_leaks=1:abort_on_error=0 \
                UBSAN_OPTIONS=exitcode=87:halt_on_error=1:print_stacktrace=1

build/asan/run: $(CLI) $(ENGINE) $(HEADERS)
	@mkdir -p build/asan
	$(CC) $(SANITIZE) $(WARN) -o $@ $(CLI) $(ENGINE) $(LDLIBS)

build/asan/unit: tests/unit.c $(ENGINE) $(HEADERS)
	@mkdir -p build/asan
	$(CC) $(SANITIZE) $(WARN) -I. -o $@ tests/unit.c $(ENGINE) $(LDLIBS)

asan: build/asan/run build/asan/unit
	@test -n "$(PYTHON)" || { echo "error: no python3 with numpy found (Debian: apt-get install python3-numpy)"; exit 1; }
	$(SANITIZER_ENV) ATTN_RUN=build/asan/run ATTN_UNIT=build/asan/unit $(PYTHON) tests/run_tests.py

# make valgrind: a portable -O2 -g build (valgrind does not know AVX-512), one thread, 32 generated tokens
VALGRIND_PROMPT = In the beginning God created
build/valgrind/run: $(CLI) $(ENGINE) $(HEADERS)
	@mkdir -p build/valgrind
	$(CC) -O2 -g $(WARN) -o $@ $(CLI) $(ENGINE) $(LDLIBS)

valgrind: build/valgrind/run
	@command -v valgrind >/dev/null || { echo "error: valgrind is not installed (Debian: apt-get install valgrind)"; exit 1; }
	valgrind --error-exitcode=99 --leak-check=full --show-leak-kinds=definite,indirect,possible \
	  --errors-for-leak-kinds=definite,indirect,possible build/valgrind/run models/kjv-5m.bin \
	  -p "$(VALGRIND_PROMPT)" -n 32 -t 0.8 -s 1 --threads 1

# make fuzz [FUZZ_SECONDS=600]: each target runs for FUZZ_SECONDS, starting from the committed seeds
# (fuzz/corpus/*) and keeping what it finds in build/fuzz/corpus/*; a crash is saved as build/fuzz/crash-*
# and stops the run. Replay one input: build/fuzz/fuzz_model FILE.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 60
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
FUZZ_RUN = -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 -artifact_prefix=build/fuzz/ -timeout=10 -rss_limit_mb=4096

build/fuzz/fuzz_%: fuzz/fuzz_%.c $(ENGINE) $(HEADERS)
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(FUZZ_FLAGS) $(WARN) -I. -o $@ $< $(ENGINE) $(LDLIBS)

fuzz: build/fuzz/fuzz_model build/fuzz/fuzz_tokenizer build/fuzz/fuzz_chat
	@mkdir -p build/fuzz/corpus/model build/fuzz/corpus/tokenizer build/fuzz/corpus/chat
	-@test -z "$(PYTHON)" || $(PYTHON) fuzz/make_seeds.py --shared "$${ATTN_SHARED:-../shared}" build/fuzz 2>&1
	build/fuzz/fuzz_model $(FUZZ_RUN) -max_len=65536 -dict=fuzz/model.dict build/fuzz/corpus/model fuzz/corpus/model
	build/fuzz/fuzz_tokenizer $(FUZZ_RUN) -max_len=4096 build/fuzz/corpus/tokenizer fuzz/corpus/tokenizer
	build/fuzz/fuzz_chat $(FUZZ_RUN) -max_len=16384 -dict=fuzz/chat.dict build/fuzz/corpus/chat fuzz/corpus/chat

# rewrites the model seeds (deterministic; needs numpy)
fuzz-seeds:
	$(PYTHON) fuzz/make_seeds.py

clean:
	rm -f run tests/unit
	rm -rf build
