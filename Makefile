# Conveniences over dev.py, which needs nothing but Python and pip.
.PHONY: demo test clean
demo:
	python3 dev.py demo
test:
	python3 dev.py test
clean:
	rm -rf .venv build *.egg-info
