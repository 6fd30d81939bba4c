"""agent.kernel.inherit: descriptors handed across exec are taken once, only by the
process they were made for, and are close-on-exec again in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from agent.kernel.inherit import ENV, Inherited, prepare, take


def test_across_a_real_exec() -> None:
    r, w = os.pipe()
    try:
        env = prepare({"control": r, "listener:web": w})
        code = ("import os, json; from agent.kernel.inherit import take\n"
                "h = take(); fd = h.claim('control')\n"
                "print(json.dumps({'names': h.names(), 'fd': fd, "
                "'inheritable': os.get_inheritable(fd), 'env': 'AGENT_INHERIT' in os.environ,"
                "'left': h.close_unclaimed()}))")
        # os.execve keeps the pid: emulate it by claiming the pid in the child's table
        doc = json.loads(env[ENV])
        env[ENV] = json.dumps({"pid": "CHILD", "fds": doc["fds"]})
        wrapper = ("import os, json, sys; d = json.loads(os.environ['AGENT_INHERIT']);"
                   "d['pid'] = os.getpid(); os.environ['AGENT_INHERIT'] = json.dumps(d);"
                   f"exec({code!r})")
        out = subprocess.run([sys.executable, "-c", wrapper], env=env, pass_fds=(r, w),
                             capture_output=True, text=True, check=True, cwd=os.getcwd())
        got = json.loads(out.stdout)
        assert got == {"names": ["listener:web"], "fd": r, "inheritable": False,
                       "env": False, "left": ["listener:web"]}
    finally:
        os.close(r)
        os.close(w)


def test_a_table_for_another_process_or_malformed_is_ignored() -> None:
    r, w = os.pipe()
    try:
        for raw in (json.dumps({"pid": os.getpid() + 1, "fds": {"x": r}}), "{", "[]",
                    json.dumps({"pid": os.getpid(), "fds": {"x": 1}}),
                    json.dumps({"pid": os.getpid(), "fds": {"x": True}})):
            env = {ENV: raw}
            assert not take(env) and ENV not in env
        env = {ENV: json.dumps({"pid": os.getpid(), "fds": {"x": r, "gone": 999}})}
        h = take(env)
        assert h.names() == ["x"] and h.claim("x") == r and h.claim("x") is None
        assert not Inherited()
    finally:
        os.close(r)
        os.close(w)
