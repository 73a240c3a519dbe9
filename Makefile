# connwatch — the set-up commands are `make install`, `make run` and
# `make test`; each installs everything it needs (as root, on Debian 12 /
# Ubuntu) first.

SHELL := /bin/bash
.DEFAULT_GOAL := run

VENV     := .venv
PY       := $(VENV)/bin/python
BUILD    := build
BPF_OBJ  := agent/connwatch/bpf/connwatch.bpf.o
ARCH     := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo $$(uname -m)-linux-gnu)
ARGS     ?=
VERSION  := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' agent/connwatch/__init__.py)
DEB      := $(BUILD)/deb/connwatch_$(VERSION)_$(shell dpkg --print-architecture).deb
PREFIX   ?= /usr/local
# Outside the checkout, shared by every checkout on the host: the packaging
# tests' debootstrapped bookworm and .debs (tests/packaging/cwpkg.py), the
# Debian kernels the VM tests boot (tests/kernels/run-in-vm).
TEST_CACHE   := $(or $(CONNWATCH_TEST_CACHE),/var/cache/connwatch-test)
KERNEL_CACHE := /var/cache/connwatch/kernels

# Node.js and npm are taken from the machine when present (the Debian
# packages conflict with other distributions of Node) and from Debian if not.
# Build tools and everything the agent and its tests run against. Run-time
# Python dependencies come from Debian too (the venv sees system packages),
# so the tests exercise the same versions the .deb depends on. python3-psutil
# is only bench/scale.py's baseline, not a run-time dependency; tmux drives
# `connwatch top` (python3-rich) in a real terminal in its tests.
APT_PACKAGES := clang llvm libbpf-dev libbpf1 bpftool make gcc libc6-dev \
	python3 python3-venv python3-pip python3-prometheus-client python3-yaml \
	python3-psutil python3-bcrypt python3-cheroot python3-prctl python3-rich iproute2 nftables procps curl openssl \
	prometheus debootstrap lintian dpkg-dev fakeroot debhelper dh-python \
	python3-setuptools python3-all systemd strace systemd-container tmux

# What tests/kernels/run-in-vm needs to fetch Debian kernels and boot them
# under QEMU; installed only by the kernel-test targets, so `make run` and
# `make test` never need an emulator.
KERNEL_TEST_PACKAGES := qemu-system-x86 busybox-static cpio kmod \
	debian-archive-keyring
ALL_KERNELS  := 5.10 6.1 6.12
KERNELS      ?= $(ALL_KERNELS)
# What `make test-kernels` runs inside each kernel (pytest arguments): the
# VM's own checks, the per-kernel report behind docs/kernels.md, and the
# floor issue #11 names: counts (incl. close and connections older than the
# agent), restart, EMFILE, EADDRNOTAVAIL, listeners in every namespace (and
# each namespace's port range, TIME_WAIT limit and counts), fd
# headroom, system limits, per-probe fallback, WebSocket classification and
# the capabilities kept. Emulated kernels run 10-100x slower than the host:
# the slowest tests stay on the host (`make test`), the tests' deadlines
# stretch there (tests/conftest.py: deadline()), and pytest's per-test limit
# is 600 s, not 300 (test_restart took 260 s on 5.10 with the host busy).
KERNEL_TESTS ?= tests/kernels/guest_checks.py tests/kernels/kernel_report.py \
	tests/test_probe_fallback.py tests/test_core.py tests/test_listeners.py tests/test_namespaces.py \
	tests/test_restart.py tests/test_capabilities.py tests/test_system_limits.py \
	tests/test_fd_headroom.py::test_processes_without_sockets_are_reported_past_half_their_limit \
	tests/test_websocket.py::test_python_websockets_server tests/test_websocket.py::test_node_ws_server \
	-k "not churn and not bpf_program_cost and not recounts and not reads_without_capabilities and not cluster2 and not per_destination and not recounted" --durations=8 --timeout=600
# VMs booted at once: each is one emulated CPU, so as many as the host has
# cores (the whole matrix then fits CI's budget beside `make test`).
KERNEL_JOBS  ?= $(shell nproc)
# The development host's column of docs/kernels.md (no VM).
HOST_KERNEL_TESTS := tests/kernels/kernel_report.py tests/test_probe_fallback.py

# The container engine, for `make image` and the image test only (not for
# `make run`): buildah builds the image, podman runs it, runc is the OCI
# runtime (containerd's default; bookworm's crun 1.8 refuses hosts with
# cgroup v1 and v2 both mounted). Rootful, host network, overlay storage: no
# slirp4netns, netavark or fuse-overlayfs needed (uidmap comes with buildah).
IMAGE_APT_PACKAGES := buildah podman runc

.PHONY: run test deps apt apt-image venv bpf node dashboards check-dashboards deb \
	image test-packaging bench soak clean clean-cache apt-kernel-tests kernels test-kernels kernels-doc install

run: deps
	$(VENV)/bin/connwatch run $(ARGS)

test: deps apt-image
	$(PY) -m pytest tests $(ARGS)

deps: apt venv bpf node

# `connwatch` on PATH: a link to the virtualenv's entry point, so the
# checkout stays what runs (`make clean` removes the link with the venv).
install: deps
	install -d $(PREFIX)/bin
	ln -sfn $(CURDIR)/$(VENV)/bin/connwatch $(PREFIX)/bin/connwatch

# $(call apt_install,PACKAGES[,SHELL]): install what is missing of PACKAGES;
# SHELL may add more to $$missing
define apt_install
	@missing=""; for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	$(2) \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

apt:
	$(call apt_install,$(APT_PACKAGES),command -v npm >/dev/null || missing="$$missing nodejs npm";)

apt-image:
	$(call apt_install,$(IMAGE_APT_PACKAGES))

apt-kernel-tests:
	$(call apt_install,$(KERNEL_TEST_PACKAGES))

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

bpf: $(BPF_OBJ)

# vmlinux.h is not generated from the build host's kernel: it is committed,
# made from a pinned Debian kernel package (bpf/vmlinux/generate), so the
# object is the same on every build host and CO-RE fits it to each kernel.
# -mcpu=v3 for 32-bit jumps and ALU; no fetching atomics (they need v5.12).
$(BPF_OBJ): bpf/connwatch.bpf.c $(wildcard bpf/*.h) bpf/vmlinux/$(ARCH)/vmlinux.h
	mkdir -p $(dir $@)
	clang -g -O2 -Wall -Werror -target bpf -mcpu=v3 -D__TARGET_ARCH_$(ARCH) \
		-Ibpf/vmlinux/$(ARCH) -Ibpf -I/usr/include/$(MULTIARCH) -c $< -o $@.tmp
	llvm-strip -g $@.tmp 2>/dev/null; mv $@.tmp $@

node: tests/node/node_modules/.installed

tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Generated files (dashboard JSON, alert rules and their Kubernetes copies,
# the metric tables of docs/metrics.md) are committed; the tests fail when
# they are stale.
dashboards: venv
	$(PY) -m dashboards.generate
	$(PY) packaging/kubernetes/generate.py
	$(PY) -m connwatch.metrics_doc

check-dashboards: venv
	$(PY) -m dashboards.generate --check
	$(PY) packaging/kubernetes/generate.py --check
	$(PY) -m connwatch.metrics_doc --check

deb: deps
	packaging/build-deb.sh

# localhost/connwatch:<version>, built with buildah from the .deb on a base
# image made here from a debootstrapped bookworm (no registry needed; see
# docs/packaging.md). The base root is the packaging tests' cached tarball.
image: deb apt-image
	packaging/container/build-image.sh "$$($(PY) tests/packaging/cwpkg.py bookworm-tarball)" \
		$(DEB) localhost/connwatch:$(VERSION)

test-packaging: deps apt-image
	$(PY) -m pytest tests/packaging $(ARGS)

bench: deps
	$(PY) -m bench $(ARGS)

# The churn soak for 10 minutes per mode, with and without the syscall hook
# (CI runs the same tests for 20 s each).
soak: deps
	CONNWATCH_SOAK_SECONDS=600 $(PY) -m pytest tests/test_soak.py $(ARGS)

# Fetch and unpack the Debian kernels the VM tests boot (cached under
# /var/cache/connwatch/kernels), so a CI run can warm the cache first.
kernels: apt-kernel-tests
	for k in $(KERNELS); do tests/kernels/run-in-vm --prepare $$k || exit; done

# The pinned vmlinux.h and the runner's own checks (on the host, booting one
# VM), then KERNEL_TESTS inside each of the Debian kernels with a summary
# table, the host's report, and docs/kernels.md compared with what was just
# measured (on a full run: every kernel's report is needed).
test-kernels: deps kernels
	bpf/vmlinux/generate --check
	$(PY) -m pytest -p no:cacheprovider tests/kernels/vm_runner_checks.py
	tests/kernels/matrix --jobs $(KERNEL_JOBS) $(KERNELS) -- $(KERNEL_TESTS)
	tests/kernels/matrix host -- $(HOST_KERNEL_TESTS)
	if [ "$(KERNELS)" = "$(ALL_KERNELS)" ]; then tests/kernels/render_kernels_doc --check; fi

# Rewrite docs/kernels.md from the reports of the last `make test-kernels`.
kernels-doc:
	tests/kernels/render_kernels_doc

# Everything the build and the tests leave in the checkout, and the link of
# `make install` if it points here. The caches outside: `make clean-cache`.
clean:
	rm -rf $(BUILD) $(BPF_OBJ) $(VENV) tests/node/node_modules agent/connwatch.egg-info .pytest_cache .hypothesis
	find agent bench dashboards packaging tests -name __pycache__ -type d -prune -exec rm -rf {} +
	if [ "$$(readlink $(PREFIX)/bin/connwatch)" = "$(CURDIR)/$(VENV)/bin/connwatch" ]; then \
		rm $(PREFIX)/bin/connwatch; fi

# The caches `make test` and `make test-kernels` leave outside the checkout,
# and the container images (the connwatch images before the base they are
# built on; images a container still uses stay).
clean-cache:
	rm -rf $(TEST_CACHE) $(KERNEL_CACHE)
	if [ -d $(dir $(KERNEL_CACHE)) ]; then rmdir --ignore-fail-on-non-empty $(dir $(KERNEL_CACHE)); fi
	if command -v podman >/dev/null; then \
		podman rmi --ignore localhost/connwatch:test localhost/connwatch:$(VERSION) && \
		base=$$(podman images --format '{{.Repository}}:{{.Tag}}' localhost/connwatch-base) && \
		if [ -n "$$base" ]; then podman rmi --ignore $$base; fi; \
	fi
