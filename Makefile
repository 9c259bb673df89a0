# SPDX-License-Identifier: MIT
# netbpf build: BPF objects (CO-RE), the vendored libbpf when present, the Python package.
#   make            build everything and install the package (editable) for $(PYTHON)
#   make deps       install the Debian packages the build and the tests need
#   make test       run the test suite (root; loads programs into the running kernel)
#   make evaluate   run the latency experiment and the benchmark driver
#   make bench      pytest-benchmark: loader cycle, multiport bind+getsockname
#   make vmtest     the tests on Debian's 6.1 kernel under QEMU (VM=6.12: Debian's 6.12; KERNEL=image: another)
#   make kernel     Debian's 6.1 (KVER=6.12: 6.12) with kernel/patches/KVER, for make vmtest KERNEL=...
#   make selftests  the 6.12 series' BPF selftests in a VM (KVER=6.12; KERNEL=image, else Debian's)
#   make clean      remove build output
#   V=1             show the commands

PYTHON  ?= python3
CLANG   ?= clang
BPFTOOL ?= $(shell command -v bpftool || ls /usr/sbin/bpftool 2>/dev/null)
CC      ?= cc

BUILD   := build
PKG_BPF := src/netbpf/bpf
ARCH    := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/' -e 's/ppc64le/powerpc/' -e 's/riscv64/riscv/' -e 's/s390x/s390/')

# build, then what the tests and the experiments drive (redis, perf)
DEB_PACKAGES := clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev pkg-config make gcc iproute2 \
                python3-pip redis-server redis-tools iperf3 sockperf nginx wrk prometheus

ifeq ($(V),1)
Q :=
msg :=
else
Q := @
msg = @printf '  %-8s %s\n' "$(1)" "$(2)";
endif

.DELETE_ON_ERROR:
.PHONY: all deps check-tools test evaluate bench vmtest kernel selftests needed clean

# --- vendored libbpf (git submodule external/libbpf), used when its sources are present ---
LIBBPF_SRC := external/libbpf/src
ifneq ($(wildcard $(LIBBPF_SRC)/Makefile),)
LIBBPF_DEST := $(abspath $(LIBBPF_SRC)/install-dir)
LIBBPF_SO   := $(firstword $(wildcard $(LIBBPF_DEST)/usr/lib64/libbpf.so.1 $(LIBBPF_DEST)/usr/lib/libbpf.so.1) $(LIBBPF_DEST)/usr/lib64/libbpf.so.1)
LIBBPF_INC  := -I$(LIBBPF_DEST)/usr/include
LIBBPF_DEP  := $(BUILD)/libbpf.stamp
else
LIBBPF_INC  :=
LIBBPF_DEP  :=
endif

BPF_SRCS   := $(wildcard bpf/*.bpf.c)
BPF_OBJS   := $(patsubst bpf/%.bpf.c,$(PKG_BPF)/%.bpf.o,$(BPF_SRCS))
TEST_SRCS  := $(wildcard tests/bpf/*.bpf.c)
TEST_OBJS  := $(patsubst tests/bpf/%.bpf.c,$(BUILD)/tests/%.bpf.o,$(TEST_SRCS))
EVAL_SRCS  := $(wildcard evaluate/*.bpf.c)
EVAL_OBJS  := $(patsubst evaluate/%.bpf.c,$(BUILD)/evaluate/%.bpf.o,$(EVAL_SRCS))
EVAL_BINS  := $(patsubst %.c,%,$(filter-out $(EVAL_SRCS),$(wildcard evaluate/*.c)))

BPF_CFLAGS := -g -O2 -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) \
              -I$(BUILD) -Ibpf $(LIBBPF_INC)

all: check-tools $(BPF_OBJS) $(TEST_OBJS) $(EVAL_OBJS) $(EVAL_BINS) $(if $(LIBBPF_DEP),$(PKG_BPF)/libbpf.so.1) $(BUILD)/installed.stamp

deps:
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEB_PACKAGES)

check-tools:
	@command -v $(CLANG) >/dev/null || { echo "make: clang not found (Debian: apt-get install clang llvm, or: make deps)" >&2; exit 2; }
	@[ -n "$(BPFTOOL)" ] || { echo "make: bpftool not found (Debian: apt-get install bpftool, or: make deps)" >&2; exit 2; }
	@[ -n "$(LIBBPF_DEP)" ] || [ -f /usr/include/bpf/bpf_helpers.h ] || { echo "make: libbpf headers not found (Debian: apt-get install libbpf-dev, or: make deps)" >&2; exit 2; }
	@[ -r /sys/kernel/btf/vmlinux ] || { echo "make: /sys/kernel/btf/vmlinux missing: the kernel needs CONFIG_DEBUG_INFO_BTF=y" >&2; exit 2; }

# vmlinux.h comes from the running kernel's BTF at build time: CO-RE relocates field offsets at
# load time anyway, and generating it keeps the repository free of a 3 MB generated header.
$(BUILD)/vmlinux.h: | $(BUILD)
	$(call msg,GEN,$@)
	$(Q)$(BPFTOOL) btf dump file /sys/kernel/btf/vmlinux format c > $@

$(BUILD)/libbpf.stamp: | $(BUILD)
	$(call msg,LIBBPF,$(LIBBPF_SRC))
	$(Q)OBJDIR=build DESTDIR=install-dir $(MAKE) -C $(LIBBPF_SRC) install $(if $(filter 1,$(V)),,>/dev/null)
	$(Q)touch $@

$(PKG_BPF)/%.bpf.o: bpf/%.bpf.c bpf/*.h $(BUILD)/vmlinux.h $(LIBBPF_DEP) | $(PKG_BPF)
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

$(BUILD)/tests/%.bpf.o: tests/bpf/%.bpf.c $(BUILD)/vmlinux.h $(LIBBPF_DEP) | $(BUILD)/tests
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

$(BUILD)/evaluate/%.bpf.o: evaluate/%.bpf.c $(BUILD)/vmlinux.h $(LIBBPF_DEP) | $(BUILD)/evaluate
	$(call msg,BPF,$@)
	$(Q)$(CLANG) $(BPF_CFLAGS) -c $< -o $@

evaluate/%: evaluate/%.c
	$(call msg,CC,$@)
	$(Q)$(CC) -O2 -Wall -Wextra -o $@ $< -lm

# The loader prefers a libbpf.so.1 next to the objects: the vendored one when it was built.
$(PKG_BPF)/libbpf.so.1: $(LIBBPF_DEP) | $(PKG_BPF)
	$(call msg,CP,$@)
	$(Q)cp -L $(LIBBPF_SO) $@

# Editable install for the machine's python, so `python3 -m netbpf.bypass` works anywhere.
$(BUILD)/installed.stamp: pyproject.toml | $(BUILD)
	$(call msg,PIP,netbpf (editable) for $(PYTHON))
	$(Q)PIP_BREAK_SYSTEM_PACKAGES=1 $(PYTHON) -m pip install -q -e '.[test,plot,metrics]' $(if $(filter 1,$(V)),,>/dev/null)
	$(Q)touch $@

$(BUILD) $(BUILD)/tests $(BUILD)/evaluate $(PKG_BPF):
	$(Q)mkdir -p $@

test: all
	$(PYTHON) -m pytest $(PYTEST_ARGS)

evaluate: all
	evaluate/test-bypasser.sh
	$(PYTHON) -m evaluate.bench $(BENCH_ARGS)

bench: all
	$(PYTHON) -m pytest --benchmark-only tests/test_bench_loader.py tests/test_bench_multiport.py

vmtest: all
	VM_KERNEL=$(KERNEL) VM_SERIES=$(VM) tests/vm/run.sh

# Debian's source of series KVER with kernel/patches/KVER, for `make vmtest KERNEL=...` (about half an hour)
KVER ?= 6.1
kernel:
	KVER=$(KVER) kernel/build.sh

# The series' BPF selftests (test_progs holding only them; make kernel's tree carries them), run
# under QEMU on KERNEL, or on Debian's unpatched image of the series: make selftests KVER=6.12
selftests:
	test_progs=$$(KVER=$(KVER) kernel/selftests.sh) && \
	VM_COMMAND="$$test_progs" VM_KERNEL=$(KERNEL) VM_SERIES=$(KVER) tests/vm/run.sh

# Each fix of the series is needed: built without it, the kernel fails the subtests its commit
# message names, and only those (kernel/needed.sh; a kernel build and a VM run per fix)
needed:
	KVER=$(KVER) kernel/needed.sh

clean:
	rm -rf $(BUILD) $(PKG_BPF) $(EVAL_BINS)
	[ ! -d $(LIBBPF_SRC) ] || rm -rf $(LIBBPF_SRC)/build $(LIBBPF_SRC)/install-dir
