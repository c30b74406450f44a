# The two README commands: `make demo` and `make test`. Each builds .venv itself.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
MNIST   ?= ../shared/data/mnist

.PHONY: demo test bench lint clean mutation mutation-report

.venv/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the local CPU build (see constraints.txt)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

# bench peers, for the tests too (they check the brevitas export): bayesian-torch declares
# torchvision (a CUDA wheel here) but its dnn_to_bnn does not import it, so it goes in
# without its declared dependencies.
.venv/.bench: .venv/.installed
	$(PIP) install -q -c constraints.txt brevitas
	$(PIP) install -q --no-deps bayesian-torch
	touch $@

demo: .venv/.installed
	$(PY) -m pqnet demo

test: .venv/.bench
	$(PY) -m pytest -q --randomly-seed=2026

bench: .venv/.bench
	$(PY) benchmarks/train_speed.py --data-dir $(MNIST) --profile
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/frontier.py --data-dir $(MNIST) --seeds 0 1 2
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/prune_rank.py --data-dir $(MNIST) --seeds 0 1 2
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/coders.py --data-dir $(MNIST)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pqnet bench --model lenet5 --data mnist --data-dir $(MNIST) \
		--bnn-init deterministic --bnn-epochs 10 --finetune-epochs 2 \
		--json benchmarks/quantize_lenet5.json --plot benchmarks/quantize_lenet5.png \
		--no-progress
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/pwfn_scale.py --json benchmarks/pwfn_scale.json
	OMP_WAIT_POLICY=PASSIVE $(PY) benchmarks/kl_precision.py --json benchmarks/kl_precision.json

# Mutation testing of the core (not part of `make test`; see TESTING.md). One mutmut run per
# group of modules, the core first; pqnet.inference and pqnet.bnn last. Results are cached in
# mutants/ (a rerun checks only new or changed functions). Pick groups with
# `make mutation MUTATE='pqnet._io.* pqnet.quantize.budget.*'`; JOBS mutants run at once.
MUTMUT  := .venv/bin/mutmut
JOBS    ?= 1
MUTATE  ?= pqnet._io.* pqnet._checks.* pqnet.quantize.* pqnet.diagnostics.* pqnet.inference.* pqnet.bnn.*

.venv/.mutmut: .venv/.bench
	$(PIP) install -q -c constraints.txt mutmut==3.8.1
	touch $@

mutation: .venv/.mutmut
	for group in $(MUTATE); do \
		OMP_NUM_THREADS=1 $(MUTMUT) run --max-children $(JOBS) "$$group" || exit 1; \
	done
	$(PY) tools/mutation_report.py

mutation-report:
	$(PY) tools/mutation_report.py --survivors

lint: .venv/.installed
	$(PY) -m ruff check pqnet tests benchmarks

clean:
	rm -rf .venv build *.egg-info mutants
