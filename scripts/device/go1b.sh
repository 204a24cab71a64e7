mkdir -p /tmp/model_a && cp .gpu/a/model_a.npz /tmp/model_a/ && ls -la /tmp/model_a
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(ls .whl/*.whl | grep -v typing_extensions) || exit 3
ls /tmp/site | head -3; echo ok
