# shellcheck shell=bash
# Guest side of the shared-versions checks (sourced after checks.sh): a kernel
# with berth's shared-versions patches, a share served with --shared-cache on
# the generic vhost-user device (the version table in region 1), and a second
# share served with --cache never that carries the host's signals.

# Mounts share $1 and checks that the kernel found the table in region 1 and
# did not reject it.
sv_mount() {
	mount_shares "$1"
	local found
	found=$(dmesg | grep -E 'version table|not a version table' || true)
	echo "@@info ${found:-no version table message from the kernel}"
	[[ $found == *"version table: 0x"* ]]
	[[ $found != *"not a version table"* ]]
}

# Waits up to $1 tenths of a second for file $2.
sv_wait_for() {
	local tenths=$1 file=$2
	for _ in $(seq "$tenths"); do
		[ -e "$file" ] && return 0
		sleep 0.1
	done
	[ -e "$file" ]
}

# sv_eventually WHAT COMMAND...: COMMAND succeeds within 5 s (host processes'
# changes reach the table through berth's watcher, asynchronously); says how
# long it took.
sv_eventually() {
	local what=$1 start
	shift
	start=$(micros)
	for _ in $(seq 100); do
		if "$@"; then
			echo "@@info $what: seen after $((($(micros) - start) / 1000)) ms"
			return 0
		fi
		sleep 0.05
	done
	echo "@@detail $what: not seen within 5 s"
	false
}

sv_mode_is() { [ "$(stat -c %a "$1")" = "$2" ]; }
sv_size_is() { [ "$(stat -c %s "$1")" = "$2" ]; }
sv_links_are() { [ "$(stat -c %h "$1")" = "$2" ]; }
sv_content_is() { [ "$(cat "$1")" = "$2" ]; }
sv_exists() { [ -e "$1" ]; }
sv_gone() { [ ! -e "$1" ]; }
# Whether a listing of directory $1 (a readdir, through the glob) holds $2.
sv_listed() {
	local f
	for f in "$1"/*; do
		[ "${f##*/}" != "$2" ] || return 0
	done
	return 1
}
sv_unlisted() { ! sv_listed "$@"; }

# sv_host_changes DIR READY DONE: caches what a host process is about to change
# in DIR (attributes, contents, names, a missing name), says so (creates READY),
# and once the host has changed it all (DONE exists) sees every change at its
# next stat, open or readdir.
sv_host_changes() {
	local d=$1 ready=$2 done=$3
	sv_mode_is "$d/chmod-me" 644
	sv_content_is "$d/grow-me" one
	sv_links_are "$d/link-me" 1
	sv_exists "$d/rename-me"
	sv_exists "$d/unlink-me"
	sv_gone "$d/created"
	ls "$d" >/dev/null
	touch "$ready"
	sv_wait_for 1200 "$done"
	sv_eventually chmod sv_mode_is "$d/chmod-me" 600
	sv_eventually "write and size" sv_content_is "$d/grow-me" "one
two"
	sv_eventually "hard link" sv_links_are "$d/link-me" 2
	sv_eventually create sv_exists "$d/created"
	sv_eventually "create (readdir)" sv_listed "$d" created
	sv_eventually rename sv_exists "$d/renamed"
	sv_eventually "rename (old name)" sv_gone "$d/rename-me"
	sv_eventually unlink sv_gone "$d/unlink-me"
	sv_eventually "unlink (readdir)" sv_unlisted "$d" unlink-me
}

# Stats every file of $1/storm 20 times over: after the first round nothing has
# changed, so the kernel answers from its cache (the host counts the requests).
sv_stat_storm() {
	local d=$1/storm n
	n=$(find "$d" -type f | wc -l)
	echo "@@info $n files, 20 rounds"
	for _ in $(seq 20); do
		stat "$d"/* >/dev/null
	done
	touch "$2/storm-done"
}

# Guest A of the pair: once guest B has cached everything ($2/b-ready), makes
# the same changes a host process makes in sv_host_changes, through its own
# berth daemon, then says so ($2/a-done).
sv_pair_change() {
	local d=$1/pair sig=$2
	sv_wait_for 3000 "$sig/b-ready"
	chmod 600 "$d/chmod-me"
	echo two >>"$d/grow-me"
	ln "$d/link-me" "$d/link-me-too"
	echo new >"$d/created"
	mv "$d/rename-me" "$d/renamed"
	rm "$d/unlink-me"
	touch "$sig/a-done"
}

# Guest B of the pair: caches what guest A is about to change, and once A is
# done sees every change at its very next stat, open or readdir (A's daemon
# moved the versions before it answered A): no retries here.
sv_pair_seen() {
	local d=$1/pair sig=$2
	sv_mode_is "$d/chmod-me" 644
	sv_content_is "$d/grow-me" one
	sv_links_are "$d/link-me" 1
	sv_exists "$d/rename-me"
	sv_exists "$d/unlink-me"
	sv_gone "$d/created"
	ls "$d" >/dev/null
	touch "$sig/b-ready"
	sv_wait_for 3000 "$sig/a-done"
	sv_mode_is "$d/chmod-me" 600
	sv_content_is "$d/grow-me" "one
two"
	sv_size_is "$d/grow-me" 8
	sv_links_are "$d/link-me" 2
	sv_exists "$d/created"
	sv_listed "$d" created
	sv_exists "$d/renamed"
	sv_gone "$d/rename-me"
	sv_gone "$d/unlink-me"
	sv_unlisted "$d" unlink-me
}
