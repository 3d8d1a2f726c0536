# shellcheck shell=bash
# The metadata workloads' inputs, shared by benches/shared-cache.sh (host mounts) and
# benches/guest-shared-cache.sh (guests): sourced, not run.

# stat_tree ROOT N: N one-byte files, 1 000 per directory (ROOT/dNNNN/fNNNN).
stat_tree() {
	python3 - "$1" "$2" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"d{i // 1000:04d}")
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"f{i % 1000:04d}"), "w") as f:
        f.write("x")
PY
}

# git_checkout SOURCE CHECKOUT TARBALL N: a repository of N small C files (200 per
# directory) committed in SOURCE, cloned to CHECKOUT with its index refreshed, and the
# files (without .git) in TARBALL, for the untar workload.
git_checkout() {
	local source=$1 checkout=$2 tarball=$3 n=$4
	python3 - "$source" "$n" <<'PY'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, f"src{i // 200:03d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"file{i:05d}.c"), "w") as f:
        f.write(f"int f{i}(void) {{ return {i}; }}\n")
PY
	git -C "$source" init -q
	git -C "$source" -c user.email=bench@berth -c user.name=bench add -A
	git -C "$source" -c user.email=bench@berth -c user.name=bench commit -qm tree
	git clone -q "$source" "$checkout"
	# An index written in the same second as the files leaves them "racily clean": the
	# first status would read them all and rewrite the index (in a cold pass only).
	# Refreshed a second later, every status only stats.
	sleep 1.1
	git -C "$checkout" update-index -q --really-refresh
	tar -C "$source" -cf "$tarball" --exclude=.git .
}
