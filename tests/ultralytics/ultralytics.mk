# Optional check against real Ultralytics (AGPL-3.0, needs torchvision): never a dependency of edgeport.
# `make ultralytics-check` builds .venv-ultralytics from tests/ultralytics/requirements.txt, has Ultralytics write
# checkpoints of YOLO("yolo11n.yaml") the way its trainer and YOLO.save() do plus its own outputs, then loads them in
# edgeport's .venv (no Ultralytics there) and compares: <= 1e-4 relative on boxes and scores.
UL_VENV   ?= .venv-ultralytics
UL_PY     := $(UL_VENV)/bin/python
UL_STAMP  := $(UL_VENV)/.installed
UL_OUT    ?= $(OUT)/ultralytics-check
UL_ENV    := YOLO_OFFLINE=1 YOLO_AUTOINSTALL=False YOLO_CONFIG_DIR=$(abspath $(UL_VENV))/config

.PHONY: ultralytics-setup ultralytics-check

ultralytics-setup: $(UL_STAMP)

$(UL_STAMP): tests/ultralytics/requirements.txt
	@test -x $(UL_PY) || $(PYTHON) -m venv $(UL_VENV)
	$(UL_ENV) $(UL_PY) -m pip install --quiet --disable-pip-version-check -r tests/ultralytics/requirements.txt
	@touch $@

ultralytics-check: setup ultralytics-setup
	$(UL_ENV) $(UL_PY) tests/ultralytics/make_reference.py $(UL_OUT)
	$(UL_ENV) $(PY) tests/ultralytics/check_against_reference.py $(UL_OUT)
