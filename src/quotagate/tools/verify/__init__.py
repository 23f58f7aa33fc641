"""``quotagate verify``: the seed tutorial's Verification list as a command, with an evidence
record.

The tutorial asks an operator to confirm the starting state, run the smallest complete path,
compare against the expected output and keep the evidence (command, versions, observed output)
so the result can be reproduced. This does exactly that against a gateway, either one it is
pointed at (``--url``) or one it starts itself on a free loopback port and stops by pid:

- the (N+1)th rapid request is 429 with the tutorial's exact JSON body;
- Retry-After is present and sensible;
- rate-limit headers are on the successful responses, and they move;
- two API keys are counted independently (the tutorial's first "common failure");
- /health is not limited at the inference threshold;
- with ``--restart``, counters reset after a restart (memory), or on Redis after the keys
  under the configured ``[storage] prefix`` are deleted (as ``quotagate reset`` does: SCAN +
  UNLINK, never FLUSHDB).

Exit 0 when every check passes, 1 when one fails, 2 on a usage or connection error.

The modules, in the order a run uses them:

- ``evidence``: ``Exchange`` (a request and its answer), ``Check`` (a verdict and its
  exchanges), the HTTP client that records them, the JSON record;
- ``limits``: the request limit under test, from the config or from response headers;
- ``setup``: the config and keys, the gateway under test (``--url`` or started here), and
  verify's own access to Redis, through the configured storage (its prefix, its timeout);
- ``state``: the starting state gathered into the record, and printed from it;
- ``checks``: what the burst shows (headers, the 429 and its body, Retry-After);
- ``probes``: the checks that send requests of their own (keys apart, /health, restart);
- ``run``: the burst and the checks in turn; ``command``: the click command.
"""

from .command import verify_command

__all__ = ["verify_command"]
