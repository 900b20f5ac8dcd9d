# Sourced by the set-up scripts: picks the Python they install into and run with, as PY.
#   $PYTHON if set; else python3, unless python3 is an externally managed interpreter (PEP 668,
#   e.g. Debian's or Ubuntu's /usr/bin/python3) outside any virtual environment: then a
#   virtual environment in .venv (made once, seeing the system's packages, so a torch already
#   installed there is used), whose bin/ is put first on PATH for the tools pip installs.
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
elif python3 -c 'import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)'; then
  echo "python3 is externally managed (PEP 668): installing into a virtual environment, .venv" >&2
  python3 -m venv --system-site-packages .venv
  PY=.venv/bin/python
else
  PY=python3
fi
case $PY in
  .venv/*) PATH="$PWD/.venv/bin:$PATH"; PY="$PWD/$PY" ;;
esac
export PATH
