.PHONY: install test lint app bench experiment
install:
	pip install -e ".[dev]"
test:
	python -m pytest
lint:
	ruff check icsviz tests benchmarks app.py && ruff format --check icsviz tests benchmarks app.py
app:
	streamlit run app.py
bench:
	cd benchmarks && python capture_cost.py && python capture_parts.py && python norms_one_pass.py && python live_chunks.py && python overhead.py && python per_step.py && python depth.py && python budget_error.py && python app_speed.py && python folder_speed.py && python browser_speed.py && python first_capture.py && python writer_contention.py && python trace_walk.py
experiment:
	icsviz experiment --dataset cifar10 --data-dir ../shared/data/cifar-10-batches-py-subset --epochs 50 --gradient-shift --batch-stats 10 --out-dir runs --overwrite
