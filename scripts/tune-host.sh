#!/usr/bin/env bash
# tune-host.sh: kernel settings for 100k-1M WebSocket connections (see kernel-tuning.md).
#
#   scripts/tune-host.sh                 # show current and recommended values (changes nothing)
#   scripts/tune-host.sh --apply [1m]    # save the current values, then apply (100k by default)
#   scripts/tune-host.sh --restore       # put the saved values back
#
# sysctls apply at once but not across reboots (kernel-tuning.md says how to persist
# them); per-process limits (open files, memlock) are the service manager's: shown only.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
help_if_asked "$0" "$@"
backup=${SHARDGATE_TUNE_BACKUP:-/var/tmp/shardgate-tune-backup.conf}

# name | value for 100k | value for 1M
settings=(
  "fs.nr_open|1048576|1100000"
  "fs.file-max|262144|2200000"
  "net.core.somaxconn|4096|65535"
  "net.ipv4.tcp_max_syn_backlog|8192|65535"
  "net.core.netdev_max_backlog|16384|65536"
  "net.ipv4.ip_local_port_range|1024 65535|1024 65535"
  "net.ipv4.tcp_tw_reuse|1|1"
  "net.ipv4.tcp_fin_timeout|15|15"
  "net.ipv4.tcp_rmem|4096 16384 4194304|4096 8192 4194304"
  "net.ipv4.tcp_wmem|4096 16384 4194304|4096 8192 4194304"
  "net.ipv4.tcp_mem|786432 1048576 1572864|3145728 4194304 6291456"
  "net.netfilter.nf_conntrack_max|262144|2097152"
)

current() { sysctl -n "$1" 2>/dev/null | tr -s '\t ' ' ' || true; }

show() {
  printf '%-34s %-26s %-26s %s\n' setting current "for 100k" "for 1M"
  for s in "${settings[@]}"; do
    IFS='|' read -r name v100k v1m <<<"$s"
    cur=$(current "$name")
    printf '%-34s %-26s %-26s %s\n' "$name" "${cur:-(absent)}" "$v100k" "$v1m"
  done
  printf '%-34s %-26s %-26s %s\n' "RLIMIT_NOFILE (hard, this shell)" "$(ulimit -Hn)" "131072" "1100000"
  printf '%-34s %-26s %-26s %s\n' "RLIMIT_MEMLOCK (KiB, this shell)" "$(ulimit -l)" "unlimited" "unlimited"
  printf '%-34s %-26s %-26s %s\n' "transparent hugepages" "$(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null | grep -o '\[.*\]' || echo '(absent)')" "[madvise]" "[madvise]"
  printf '%-34s %-26s %-26s %s\n' "cpu frequency governor" "$(cat /sys/devices/system/cpu/cpu0/cpufreq/scaling_governor 2>/dev/null || echo '(not exposed)')" "performance" "performance"
  printf '%-34s %-26s\n' "NUMA nodes" "$(ls -d /sys/devices/system/node/node* 2>/dev/null | wc -l)"
  printf '%-34s %-26s\n' "CPUs" "$(nproc)"
}

apply() {
  local column=2
  [ "${1:-100k}" = 1m ] && column=3
  if [ ! -f "$backup" ]; then
    : >"$backup"
    for s in "${settings[@]}"; do
      name=${s%%|*}
      cur=$(current "$name")
      [ -n "$cur" ] && echo "$name=$cur" >>"$backup"
    done
    echo "saved the current values in $backup"
  else
    echo "keeping the earlier saved values in $backup"
  fi
  for s in "${settings[@]}"; do
    name=${s%%|*}
    value=$(cut -d'|' -f"$column" <<<"$s")
    cur=$(current "$name")
    if [ -z "$cur" ]; then echo "skip $name (not on this kernel)"; continue; fi
    # A single number is a floor: never lower a host's higher setting.
    if [[ "$value" =~ ^[0-9]+$ && "$cur" =~ ^[0-9]+$ ]] && [ "$cur" -ge "$value" ] && [ "$name" != net.ipv4.tcp_tw_reuse ] && [ "$name" != net.ipv4.tcp_fin_timeout ]; then
      echo "keep $name = $cur (at least $value)"; continue
    fi
    if sysctl -qw "$name=$value" 2>/dev/null; then echo "set  $name = $value"; else echo "FAILED $name = $value" >&2; fi
  done
  echo "per-process limits are not sysctls: give the gateway LimitNOFILE= and LimitMEMLOCK= (kernel-tuning.md)"
}

restore() {
  [ -f "$backup" ] || { echo "nothing saved at $backup" >&2; exit 1; }
  while IFS='=' read -r name value; do
    if sysctl -qw "$name=$value" 2>/dev/null; then echo "restored $name = $value"; else echo "FAILED $name" >&2; fi
  done <"$backup"
  rm -f "$backup"
}

case ${1:-show} in
  show) show ;;
  --apply) apply "${2:-100k}" ;;
  --restore) restore ;;
  *) echo "usage: $0 [--apply [100k|1m] | --restore]" >&2; exit 2 ;;
esac
