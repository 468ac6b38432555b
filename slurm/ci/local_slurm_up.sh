#!/usr/bin/env bash
# Bring up a real one-node Slurm cluster on localhost for CI (no systemd needed): munged, slurmctld,
# slurmd and, for `sacct` (NeMo-Run's SlurmExecutor polls job states with it), MariaDB + slurmdbd.
# Debian 12 packages: Slurm 22.05.8, munge 0.5.15. Must run as root. Idempotent: daemons that are
# already up (by their recorded PIDs) are left alone. Stop everything with local_slurm_down.sh.
#
# Environment:
#   SLURM_LOCAL_DIR         state, logs, configs and PID files (default /tmp/rao-local-slurm)
#   SLURM_LOCAL_ACCOUNTING  1 (default): MariaDB + slurmdbd (sacct works); 0: accounting_storage/none
#   SLURM_LOCAL_SKIP_APT    1: never call apt-get (fail if the daemons are not installed)
#   SLURM_LOCAL_PARTITION   partition name (default debug)
#   SLURM_LOCAL_TIMEOUT     seconds to wait for each daemon / for the node to become idle (default 60)
set -euo pipefail

BASE=${SLURM_LOCAL_DIR:-/tmp/rao-local-slurm}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
ETC=$BASE/etc RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state SPOOL=$BASE/spool DB=$BASE/mysql
CONF=$ETC/slurm.conf

log() { printf '[local-slurm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
alive() { [ -s "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
# until_ok SECONDS CMD...: retry CMD every 0.25 s until it succeeds or SECONDS pass.
until_ok() {
  local deadline=$(( $(date +%s) + $1 )); shift
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.25
  done
}
# start NAME CMD...: start a foreground daemon detached (setsid), record its PID.
start() {
  local name=$1; shift
  if alive "$name"; then log "$name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  setsid "$@" >"$LOG/$name.out" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  log "started $name (pid $!)"
}

[ "$(id -u)" -eq 0 ] || die "must run as root"

# ---- packages -------------------------------------------------------------------------------------
need=(slurmctld slurmd slurm-client munge)
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=0
for b in slurmctld slurmd sbatch munged; do have "$b" || missing=1; done
if [ "$ACCOUNTING" = 1 ]; then
  need+=(slurmdbd mariadb-server)
  for b in slurmdbd mariadbd; do have "$b" || missing=1; done
fi
if [ "$missing" = 1 ]; then
  [ "${SLURM_LOCAL_SKIP_APT:-0}" != 1 ] || die "Slurm is not installed and SLURM_LOCAL_SKIP_APT=1"
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE" "$SPOOL/slurmd"

# ---- munge ----------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 0700 /etc/munge
chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
# setpriv execs munged in place, so the recorded PID is munged's own.
start munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
until_ok "$TIMEOUT" sh -c 'munge -n | unmunge' || { cat "$LOG/munged.out" >&2; die "munge does not work"; }

# ---- slurm.conf -----------------------------------------------------------------------------------
HOST=$(hostname -s)
# The node name must resolve: it becomes MASTER_ADDR for torchrun.
getent hosts "$HOST" >/dev/null || echo "127.0.0.1 $HOST" >>/etc/hosts
HW=$(slurmd -C | head -n1)
# CPUs/Boards/Sockets/... exactly as slurmd detects them; memory minus a margin (10%, at most 1 GiB).
NODE_HW=$(sed -E 's/^NodeName=[^ ]+ //; s/ ?RealMemory=[0-9]+//' <<<"$HW")
MEM=$(sed -nE 's/.*RealMemory=([0-9]+).*/\1/p' <<<"$HW")
MEM=$(( MEM - (MEM / 10 < 1024 ? MEM / 10 : 1024) ))
if [ "$ACCOUNTING" = 1 ]; then
  ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=6819"
else
  ACCT_LINES="AccountingStorageType=accounting_storage/none"
fi
cat >"$CONF.new" <<CONF
ClusterName=raoci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$RUN/slurmctld.daemon.pid
SlurmdPidFile=$RUN/slurmd.daemon.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT_LINES
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$HOST NodeAddr=127.0.0.1 NodeHostname=$HOST $NODE_HW RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
mv "$CONF.new" "$CONF"
# Plain client commands (sbatch, squeue, sacct, NeMo-Run's LocalTunnel) read /etc/slurm/slurm.conf.
mkdir -p /etc/slurm
ln -sfn "$CONF" /etc/slurm/slurm.conf

# ---- accounting: MariaDB + slurmdbd ---------------------------------------------------------------
if [ "$ACCOUNTING" = 1 ]; then
  SOCK=$RUN/mysqld.sock
  if [ ! -d "$DB/mysql" ]; then
    mkdir -p "$DB"
    mariadb-install-db --no-defaults --user=root --datadir="$DB" >"$LOG/mariadb-install.log" 2>&1
  fi
  start mariadbd /usr/sbin/mariadbd --no-defaults --user=root --datadir="$DB" --socket="$SOCK" \
    --pid-file="$RUN/mariadbd.daemon.pid" --bind-address=127.0.0.1 --port=3306 \
    --innodb-buffer-pool-size=128M --log-error="$LOG/mariadbd.err"
  until_ok "$TIMEOUT" mariadb --no-defaults -S "$SOCK" -uroot -e 'select 1' \
    || { tail -20 "$LOG/mariadbd.err" >&2; die "MariaDB did not start"; }
  mariadb --no-defaults -S "$SOCK" -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'raoci';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  cat >"$ETC/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=$HOST
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=raoci
StorageLoc=slurm_acct_db
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.daemon.pid
CONF
  chmod 600 "$ETC/slurmdbd.conf"  # slurmdbd refuses a readable one
  # slurmdbd has no -f: it reads slurmdbd.conf from the directory of $SLURM_CONF.
  start slurmdbd env SLURM_CONF="$CONF" /usr/sbin/slurmdbd -D
  until_ok "$TIMEOUT" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819' \
    || { tail -20 "$LOG/slurmdbd.log" >&2; die "slurmdbd did not start"; }
fi

# ---- slurmctld + slurmd ---------------------------------------------------------------------------
start slurmctld /usr/sbin/slurmctld -D -i -f "$CONF"
until_ok "$TIMEOUT" sh -c 'scontrol ping | grep -q UP' \
  || { tail -30 "$LOG/slurmctld.log" "$LOG/slurmctld.out" >&2; die "slurmctld did not start"; }
start slurmd /usr/sbin/slurmd -D -N "$HOST" -f "$CONF"

node_ready() {
  case "$(sinfo -h -n "$HOST" -o %T 2>/dev/null)" in
    idle|mixed|allocated|completing) return 0 ;;
    down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  return 1
}
until_ok "$TIMEOUT" node_ready || { tail -30 "$LOG/slurmd.log" "$LOG/slurmd.out" >&2; die "node $HOST not idle"; }
sinfo >&2
log "up: partition $PARTITION, node $HOST, accounting=$ACCOUNTING, state in $BASE"
