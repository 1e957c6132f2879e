.PHONY: install test test-slow lm
install:
	bash scripts/install.sh
test:
	python3 -m pytest -q
test-slow:
	python3 -m pytest -q -m slow
lm:
	harness run --suite lm
