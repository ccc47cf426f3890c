#!/usr/bin/env bash
# The wheels an offline GPU host (CPython 3.12, x86_64, torch and numpy already there) needs to run
# `tuner run` / `tuner worker` and benchmarks/gpu_check.py's end-to-end part, besides what such an
# image usually has (pyyaml, typer, rich, tqdm, packaging, markupsafe, typing-extensions): the
# versions this project is tested with. Run it where PyPI is reachable; copy the folder over.
#
#   bash benchmarks/gpu_wheels.sh [DEST (default .whl)]
#   # on the GPU host:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DEST/*.whl && export PYTHONPATH=/tmp/site
#
# Add psycopg==3.3.9 and psycopg-binary==3.3.9 for a PostgreSQL store.
set -euo pipefail
dest=${1:-.whl}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
    optuna==5.0.0 sqlalchemy==2.1.9 alembic==1.20.1 colorlog==6.12.0 mako==1.4.3 \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
