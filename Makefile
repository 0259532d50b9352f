# The two commands of the README:
#   make repro   regenerate the data, every result, table and figure (dvc repro), then build the book
#   make test    run the test suite
# Both build .venv first (scripts/setup.sh); nothing but package registries is needed.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test repro book browser-check labs labs-student labs-instructor clean

setup:
	@VENV=$(VENV) bash scripts/setup.sh

test: setup
	bash scripts/setup_browser.sh
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q

repro: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro
	PATH=$(abspath $(BIN)):$$PATH bash scripts/build_book.sh

book: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/build_book.sh

browser-check: book
	mkdir -p build
	$(BIN)/python scripts/browser_check.py book/_build/html > build/browser_check.json
	$(BIN)/python scripts/browser_check.py book/_build/html/padim.html --min-images 3 --require-math > /dev/null
	for ed in student instructor; do [ ! -d build/labs/$$ed/_build/html ] || $(BIN)/python scripts/browser_check.py build/labs/$$ed/_build/html > build/browser_check_labs_$$ed.json; done

labs-student: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/build_labs.sh student

labs-instructor: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/build_labs.sh instructor

labs: labs-student labs-instructor

clean:
	rm -rf book/_build build
