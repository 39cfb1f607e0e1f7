"""scripts/gpu_check.py --device cpu end to end: every row runs (or skips with its reason), the table is
printed and the JSON written, so the GPU check cannot rot between GPU runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Rows that must pass on any CPU with requirements.txt installed.
MUST_PASS = {'resume-lsgan-off-nc1', 'resume-wgan-gp-bf16-nc2', 'benchmark-tiny', 'ada', 'channels_last',
             'faceseg', 'facenet', 'ddp', 'ddp-cam_D_off', 'export', 'demo'}
# Rows that may skip here, with the words their reason must contain.
MAY_SKIP = {'compile': 'UGATIT_SLOW_TESTS', 'low-memory': 'UGATIT_SLOW_TESTS', 'onnx': 'not installed'}
FP16_ROWS = {f'resume-{gan}-fp16-nc{n}' for gan in ('lsgan', 'wgan-gp') for n in (1, 2)}


def test_gpu_check_on_the_cpu_passes_and_writes_its_table(tmp_path):
    out = tmp_path / 'out'
    proc = subprocess.run([sys.executable, 'scripts/gpu_check.py', '--device', 'cpu', '--out', str(out),
                           '--work', str(tmp_path / 'work')], cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    report = json.loads((out / 'gpu_check.json').read_text())
    rows = {row['name']: row for row in report['rows']}
    failed = {name: (row['note'], row['log_tail']) for name, row in rows.items() if row['status'] == 'fail'}
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert report['finished'] and report['header']['device'] == 'cpu'

    assert '| row | status | s | s/it | peak MB | note |' in proc.stdout
    assert (out / 'gpu_check.md').read_text().count('\n| ') == len(rows) + 1
    expected = MUST_PASS | set(MAY_SKIP) | FP16_ROWS
    assert expected <= rows.keys()
    for name in MUST_PASS:
        assert rows[name]['status'] == 'pass', (name, rows[name])
    for name, reason in MAY_SKIP.items():
        assert rows[name]['status'] == 'pass' or reason in rows[name]['note'], (name, rows[name])
    for name in FP16_ROWS:
        assert rows[name]['status'] == 'skip' and 'fp16 needs CUDA' in rows[name]['note']
    for name in ('resume-lsgan-off-nc1', 'resume-wgan-gp-bf16-nc2', 'ada'):
        assert 'bit for bit' in rows[name]['note']
        assert rows[name]['s_per_it'] > 0 and rows[name]['peak_mb'] > 0
    assert report['benchmark']['benchmark-tiny']['rows'][0]['reference'] is not None
    assert 'U-GAT-IT benchmark:' in proc.stdout
