.PHONY: install test test-slow lm
# The fast suite runs on every core (pytest-xdist; 2 workers on a 2-core machine). Tests that share an
# expensive module fixture or a reference run are kept on one worker by an xdist_group mark (--dist loadgroup).
install:
	bash scripts/install.sh
test:
	python3 -m pytest -q -n auto --dist loadgroup
test-slow:
	python3 -m pytest -q -m slow
lm:
	harness run --suite lm
