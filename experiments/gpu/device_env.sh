# Sourced by the scripts that run on a lent GPU machine, from the repository root: puts the
# repository on PYTHONPATH (nothing is pip-installed there) and installs the wheels carried
# in .whl/ (pydantic & co. are not on the device image) into /tmp/site.
export PYTHONUNBUFFERED=1 PYTHONPATH=".:${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH || exit 1
fi
