# Shortcuts for tasks.py, which needs nothing but Python.
.PHONY: demo test
demo:
	python3 tasks.py demo
test:
	python3 tasks.py test
