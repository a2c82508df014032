"""The torture harness: faults against real servers, and a checker of what came out.

Imports only the standard library; the drivers are imported by the worker processes and the
scenarios that need them. Parts:

- :mod:`.proxy`: a loopback TCP fault proxy (pass, delay, blackhole, reset, drop-reply), per
  listener ("tag": one per worker) so one worker can be partitioned while others are not;
- :mod:`.sink`: a fenced sink in a SQLite file shared by processes;
- :mod:`.worker`: worker processes (turns async and sync, mailbox submit and handle);
- :mod:`.checker`: overlaps, FIFO, fences, stale writes, lost and duplicated messages, and
  which violations the holder was told about;
- :mod:`.lab`: expectations, outcomes, the Lab that owns servers, proxies and workers;
- :mod:`.scenarios`: the faults, each with its invariant; :mod:`.run` the long random mix
  behind ``inturn torture``;
- :mod:`.servers` (and :mod:`.postgres_server`): throwaway redis-server, Cluster, Sentinel
  and PostgreSQL.
"""
