# The two commands of the README are `make demo` and `make test`; both set up .venv first.
.PHONY: setup demo test docs notebooks
setup:
	bash scripts/setup.sh
demo: setup
	.venv/bin/retail-cv demo
test: setup
	bash scripts/system-deps.sh
	bash scripts/test.sh
docs: setup
	.venv/bin/retail-cv docs build
# Re-run every notebook in place so the docs show fresh outputs, then clean them.
notebooks: setup
	bash scripts/run-notebooks.sh
