#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, on loopback only, for tests.
#
#   scripts/slurm_localhost.sh start [DIR]   # munged + slurmctld + slurmd; waits for the node to be idle
#   scripts/slurm_localhost.sh stop  [DIR]   # stops exactly the daemons `start` started (pid files)
#   scripts/slurm_localhost.sh env   [DIR]   # prints `export SLURM_CONF=...` for clients
#
# Needs root and the Debian packages slurmctld, slurmd, slurm-client, munge
# (`apt-get install slurm-wlm munge`). Everything lives under DIR (default
# $RLPOST_SLURM_DIR or /tmp/rlpost-slurm): a private munge key and socket, slurm.conf,
# state, spool, logs and pid files. Nothing in /etc is written and no system munged or
# Slurm daemon is touched, so it can run beside a real installation. Clients (sbatch,
# scontrol, srun inside the job) find the cluster through SLURM_CONF=DIR/slurm.conf;
# sbatch exports the environment, so the job's own srun/scontrol see it too.
#
# Network: the node and the controller are addressed as 127.0.0.1 (NodeAddr,
# SlurmctldHost=HOST(127.0.0.1)) and CommunicationParameters=NoInAddrAny,NoCtldInAddrAny make the
# daemons and srun bind to that address instead of 0.0.0.0. Ports are picked free at
# start (two jobs' clusters can run side by side).
set -euo pipefail

cmd=${1:-}
dir=${2:-${RLPOST_SLURM_DIR:-/tmp/rlpost-slurm}}
timeout_s=${RLPOST_SLURM_TIMEOUT:-60}

die() { echo "slurm_localhost: $*" >&2; exit 1; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port() {  # a TCP port nobody listens on, in 20000-29999
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 10000))
    if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q . ; then echo "$p"; return 0; fi
  done
  die "no free port found"
}

show_logs() {
  for f in "$dir"/log/*.log; do
    [ -f "$f" ] || continue
    echo "----- $f (last 30 lines)" >&2
    tail -n 30 "$f" >&2
  done
}

stop() {
  local name pidf pid
  # Reverse start order. Only pids from our own pid files, never by process name.
  for name in slurmd slurmctld munged; do
    pidf="$dir/run/$name.pid"
    [ -f "$pidf" ] || continue
    pid=$(cat "$pidf")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$pidf"
  done
  echo "slurm_localhost: stopped daemons under $dir"
}

start() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (slurmd runs jobs as their user)"
  for exe in munged mungekey slurmctld slurmd sbatch scontrol sinfo; do
    command -v "$exe" >/dev/null || die "$exe not found: apt-get install slurm-wlm munge"
  done
  if pid_alive "$dir/run/slurmctld.pid"; then die "already running under $dir (stop it first)"; fi
  # A failed start stops whatever it had started (by pid file) before exiting.
  trap 'rc=$?; if [ $rc -ne 0 ]; then stop >&2; fi' EXIT

  mkdir -p "$dir"/{munge,state,spool,log,run}
  chmod 0755 "$dir/munge"  # munged wants its socket directory searchable; the key itself is 0400

  # --- munge: private key and socket, munged as root (--force), pid recorded.
  local key="$dir/munge/munge.key" sock="$dir/munge/munge.socket"
  if [ ! -s "$key" ]; then
    mungekey --create --keyfile="$key" 2>/dev/null \
      || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
  fi
  chown root:root "$key"
  chmod 0400 "$key"
  munged --force --key-file="$key" --socket="$sock" --pid-file="$dir/run/munged.pid" \
    --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
  munge --socket="$sock" -n </dev/null | unmunge --socket="$sock" >/dev/null \
    || { show_logs; die "munged does not answer on $sock"; }

  # --- slurm.conf: one node named after this host, everything on 127.0.0.1.
  local host cpus mem ctld_port slurmd_port
  host=$(hostname -s)
  # slurmd -C: "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
  cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' | head -1)
  mem=$(slurmd -C | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' | head -1)
  cpus=${cpus:-$(nproc)}
  mem=$(( ${mem:-2048} * 9 / 10 ))  # below the real figure, or slurmd drains the node
  ctld_port=$(free_port)
  slurmd_port=$(free_port)
  [ "$ctld_port" != "$slurmd_port" ] || slurmd_port=$((ctld_port + 1))
  cat > "$dir/slurm.conf" <<EOF
# Written by scripts/slurm_localhost.sh: a one-node test cluster on loopback.
ClusterName=rlpost-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/slurmd-%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
FirstJobId=$((100000 + RANDOM * 10))
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF="$dir/slurm.conf"

  # --- daemons: they daemonize and write the pid files named in slurm.conf.
  slurmctld -i -f "$SLURM_CONF" || { show_logs; die "slurmctld did not start"; }
  for _ in $(seq 50); do pid_alive "$dir/run/slurmctld.pid" && break; sleep 0.2; done
  pid_alive "$dir/run/slurmctld.pid" || { show_logs; die "slurmctld exited"; }
  slurmd -f "$SLURM_CONF" -N "$host" || { show_logs; die "slurmd did not start"; }
  for _ in $(seq 50); do pid_alive "$dir/run/slurmd.pid" && break; sleep 0.2; done
  pid_alive "$dir/run/slurmd.pid" || { show_logs; die "slurmd exited"; }

  local deadline=$((SECONDS + timeout_s)) state=""
  while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo -h -n "$host" -o '%t' 2>/dev/null | head -1 || true)
    [ "$state" = "idle" ] && break
    sleep 1
  done
  if [ "$state" != "idle" ]; then
    sinfo -N -l >&2 || true
    scontrol show node "$host" >&2 || true
    show_logs
    die "node $host is '${state:-unknown}' after ${timeout_s}s, not idle"
  fi
  echo "slurm_localhost: node $host idle (${cpus} CPUs); slurmctld 127.0.0.1:$ctld_port, slurmd 127.0.0.1:$slurmd_port"
  echo "export SLURM_CONF=$SLURM_CONF"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$dir/slurm.conf" ;;
  *) echo "usage: $0 start|stop|env [DIR]" >&2; exit 2 ;;
esac
