"""The online part of docs/prediction.md (prose, no measured figures): kept here so that
`shadowblk predict report` regenerates the whole document."""

ONLINE = """\
## Online: from heartbeats to a planned switchover

### Signals (what an agent sends, every heartbeat)

| signal | where it comes from | heartbeat key |
|---|---|---|
| SMART, per disk | `smartctl -j -a` of the disk under the data directory, every 10 min (attributes 5, 9, 10, 12, 187-189, 194, 196-199); or `--smart-replay FILE` | `smart.devices.NAME`: the latest reading (`day`, `power_on_hours`, `attributes`) and its `history`, the readings where a tracked value changed (up to 64) |
| volume latency and load | 5 random 4 KiB READs through each primary's NBD endpoint (what a VM sees, whichever loop serves it), timed; the volumes' load from their `serve` processes' `/proc/PID/io` (bytes read and written / 4 KiB / s) | `io_window`: `probes`, `errors`, `min_ms`, `p50_ms`, `max_ms`, `iops`, `seconds`; the reads also feed the `latency_*` histogram (operation `volume-read`) |
| I/O errors | failed probes (data-dir probe, volume reads) | `io_errors` (counter) |
| checksum discrepancies | scrubs and verifies (shadowblk/integrity) | `checksum_discrepancies` (counter) |

The agent keeps each disk's history and sends it with every reading, so a manager that just
started, or took over the leadership, scores a disk exactly as one that watched it for years.
smartctl and the volume reads run in threads of their own: a slow disk never delays a
heartbeat (whose answer renews the primaries' write leases).

`shadowblk agent --smart-replay FILE [--smart-serial SERIAL] [--replay-speed DAYS_PER_SECOND]
[--replay-start YYYY-MM-DD]` reports a recorded drive instead of smartctl: a Backblaze daily CSV
or the start-stop extract in shared/data (expanded back to one reading a day, the last one on
the record's last day: its failure day for a failed drive). One recorded day goes by every
1/SPEED seconds from START; the days before START arrive at once as the disk's history. The
report's `smart.replay` says where the replay is (`date`, `last_date`, `ends_in_failure`).

### Scoring and combination (manager, `manager/risk.py`, each heartbeat)

- SMART: each disk's readings through the model (`--model FILE`, written by `shadowblk predict
  train` or `make smart-model`), cached while the reading is unchanged: P(the disk fails within
  30 days) with the features that drove it. Without `--model` SMART is shown, not scored.
- Latency: the fastest of the heartbeat's timed reads (a busy CPU slows some reads, a slow store
  all of them) goes to the server's spike detector with the load it was measured at (robust z
  against what the same server showed at the same or a higher load; slow samples never join
  the baseline). Windows with fewer than 3 reads are not judged. The latency signal is the
  share of spikes among the verdicts of the last 20 s (from 5 verdicts on); the server's
  latency is **flagged** when half of them or more were spikes.
- I/O errors and checksum discrepancies: their growth over the last 10 min.
- `combine`: P(any disk fails), shifted in log-odds by the likelihood ratios of the other
  signals; a confidence (which signals were there: SMART 0.55, latency 0.2, checksums 0.15,
  errors 0.1) with a level (high ≥ 0.8, medium ≥ 0.5, low); the evidence, strongest first.
- An agent that sends a `failure` of its own (a predictor on the server) keeps it when it is
  the higher probability, its reasons listed first as `agent: …`.

The result is the server's `health.failure` (`GET /v1/servers/NAME`, `shadowblk server show
NAME --json`): `probability`, `confidence`, `level`, `reasons` (one line per signal),
`evidence`, `signals` (each disk's score, date and drivers; the latency verdict, expected
latency, z, spike share, `flagged`; the counters' growth), `trigger`. `probability` is also the
server's `failure_probability` (`server list`), `shadowblk_server_failure_probability` and
`shadowblk_server_failure_confidence` on the manager's `/metrics`, the dashboard's column
(with the level and the trigger's state; a decision is a red mark on the timeline) and the
`FailureProbabilityHigh` alert (the reasons are its description). A fault in the predictor is
logged and shown as the reason; it never fails a heartbeat.

### The trigger

`shadowblk manager --model FILE --preempt-threshold 0.5 --preempt-sustain 1h [--preempt-dry-run]`:
once a server's probability has stayed at or above the threshold, with confidence at least
0.5, for the sustain time (a reading gap over 15 min restarts the count), the trigger fires
once; it re-arms when the probability falls below 0.8 × the threshold. `trigger.state` is
`armed`, `pending` (above the threshold, counting) or `fired`.

When it fires the manager appends a `failure-preempt` event for the server (`GET /v1/events`)
whose detail says why: `reason` (probability, confidence, how long, the explanation),
`reasons`, `smart` (each disk's score, date and drivers; the replay's position), `primaries`
(the volumes to move), `dry_run`, `action` (`report` or `drain`) and, for a drain, `drain`
(`started`, `failed: …`, or that no drain is wired). It is also logged (WARNING). Without
`--preempt-dry-run` it asks for a planned switchover of every primary on the server
(`RiskMonitor.drain(server, reason)`: the switchover orchestration's drain, called without
waiting: the decision runs on the manager's store thread).

### A change of leader

With several managers (etcd), a new leader goes on where the last one stopped. What it needs
is stored with the server at every heartbeat, in its `failure` document (SQLite or etcd, the
same store interface): the trigger's clock (`trigger.state`, `trigger.above_since`, `at`) and
the I/O error and checksum counters' windows (`counters`: the first reading of each run of
equal values within the 10 min window, the newest 64). A manager that judges a server whose
stored document is newer than its own memory (a new leader, or a former one leading again)
takes them over, so a failover neither restarts a sustained count (the trigger fires
`--preempt-sustain` after the risk first crossed the threshold, whichever leader saw it) nor
repeats a decision: a fired trigger stays fired, except when it fired to drain and primaries
are still on the server (the leader may have died mid-drain): then it fires again at once and
the rest moves. A clock kept under another policy (threshold, sustain time or dry run
changed) is not taken over: the count starts anew. A stored time ahead of this manager's clock
is taken as now. The SMART history comes with every heartbeat, so disks are scored at once.
Only the latency detector's baseline is not kept: a new leader learns it again (30 samples,
about 30 s), without a latency signal meanwhile, so a risk resting on latency alone can fall
under the threshold at a failover and its count restart (a baseline is per-sample state that
would have to be written at every heartbeat, and 30 s of learning is short next to any
sensible sustain time).

### The demo's predictive act

`make demo` ends with it (`tools/demo/predictive.py`, after the planned and emergency
switchovers): a second lab, `shadowblk lab up --servers 2 --model build/smart-model.json
--preempt-threshold 0.5 --preempt-sustain 5s --smart-replay s1=9VS1QC90.csv --smart-serial
s1=9VS1QC90 --replay-start s1=2014-04-19 --replay-speed 0.5`, where `9VS1QC90.csv` holds that
drive's rows of shared/data's extract (a Seagate ST31500341AS that failed on 2014-05-24, held
out of `make smart-model`'s training by its serial's hash). A 64 MiB sync volume on s1 with its
shadow on s2; `attach` and fio (random 4 KiB writes, each flushed, then every block verified)
as the VM; one recorded day every 2 s. The demo prints s1's probability, confidence and
trigger state day by day: under 0.02 until 2014-05-04, 0.77 on 2014-05-05 (reallocated
sectors jump from 70 to 4092), fired 5 s later; then the `failure-preempt` decision with its
reasons and the drive's top features (its model's drivers: the rule attributes' log sum, the
rule flag, hours since SMART 197 last grew), the switchover record (s1 -> s2, its pause and
reason), the recorded day it moved (about 16 days before the failure) and fio's verification
through attach. `make demo` trains `build/smart-model.json` the first time (1-3 min; `make
smart-model` retrains it). `shadowblk lab up --help` lists the predictor's options
(`--model`, `--preempt-threshold`, `--preempt-sustain`, `--preempt-dry-run`, `--smart-replay
SERVER=FILE`, `--smart-serial SERVER=SERIAL`, `--replay-start SERVER=DATE`, `--replay-speed`);
`lab.json` records them.

### What an operator does

- Start with `--preempt-dry-run` and a long `--preempt-sustain`: watch the dashboard's
  probabilities and the `failure-preempt` events for a while, and compare them with what you
  know of your disks. Without `--model` only the latency, error and checksum signals count,
  with low confidence, and nothing fires (confidence under 0.5).
- A server whose probability rises: `shadowblk server show NAME` (its `reasons`, each disk's
  drivers), its SMART (`smartctl -a`), its latency plot. A flagged latency with no SMART
  reason is often a saturated or misbehaving server rather than a failing disk.
- When a decision is recorded: in dry run, move the listed primaries yourself (`shadowblk
  server drain NAME`) if you agree; otherwise watch the switchovers on the timeline. Replace
  the disk; the server's probability falls once the new disk reports, and the trigger re-arms.
- The likelihood ratios of latency, errors and checksums are settings (`CombinerSettings`),
  not learned: there is no labelled history of them yet.

### Tests

`tests/integration/test_predict_online.py` (real manager and agents, fio through the volumes,
a model trained by `predict train` on a seeded 15% sample): a failing drive's recorded days
(serial 9VS1QC90, failed 2014-05-24, not in the training sample) replayed into one agent from
30 days before its failure at one day a second: its probability rises from under 0.2 with the
SMART reasons in `server show --json` and on `/metrics`, and the dry-run decision is recorded
before the recorded failure day; a slow backing store injected into one agent while fio runs
(SHADOWBLK_TEST_IO_DELAY_FILE, shadowblk/nbd/slowdisk.py: 20 ms added to every read, write
and flush, test-only) is flagged within 30 s; a healthy agent under fio at 100, 600, 30 and
300 IOPS is never flagged; a garbage or incomplete replay CSV and a model file of an unknown
version stop the agent and the manager with one clear line. `tests/unit/test_manager_risk.py`,
`test_predict_readings.py`, `test_agent_smart_source.py`: the monitor on a real store; the
readings' format and its bad input; the start-stop replay; the replay's clock and start date.
`tests/unit/test_risk_takeover.py` (SQLite and a real etcd, heartbeats through the real
`Fleet`): a second manager taking over fires at the first one's sustain deadline, with the
error counters' growth carried over; a leader regaining a server whose drain may have been cut
short asks again, and one whose primaries have moved does not; a dry-run decision is not
repeated; a clock kept under another threshold is not taken over; a stored time ahead of the
new leader's clock is no error. `tests/integration/test_lab_cli.py`: `lab up`'s predictor and
replay options reach the manager and the agent, and their bad values are usage errors.
"""  # noqa: E501 - Markdown table rows
