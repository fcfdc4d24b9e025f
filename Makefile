# Conveniences over dev.py, which needs nothing but Python and pip.
.PHONY: demo test test-quick clean
demo:
	python3 dev.py demo
test:
	python3 dev.py test
# the edit-test loop: the tests not marked slow (every test still runs in `make test` and CI)
test-quick:
	python3 dev.py test -m "not slow"
clean:
	rm -rf .venv build *.egg-info
