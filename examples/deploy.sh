#!/bin/sh
# An example deploy command for `lockstep deploy`, used by the README's walk-through.
#
#   lockstep deploy --service api --version v1.0.0 -- ./examples/deploy.sh DIR
#
# `lockstep deploy` runs it with the new release in its environment:
#   LOCKSTEP_VERSION_ID  the new version id (a UUID v4; CODE_VERSION_UUID holds the same)
#   DEPLOY_TIME_UTC      when the deploy started (RFC 3339)
# and registers the release only when it exits 0.
#
# A real deploy command builds and ships an artifact with these baked in (an image tag, a
# bundle's constants, a unit's Environment=). This one "ships" a release file:
#   DIR/releases/<version id>.env   LOCKSTEP_VERSION_ID=… and DEPLOY_TIME_UTC=…
#   DIR/current.env                 a symlink to the release in place, switched atomically
# so a supervisor that starts workers from DIR/current.env starts the new release.
# Progress goes to stderr: the last line of `lockstep deploy`'s stdout stays the version id.
set -eu

dir=${1:?usage: deploy.sh DIR (run it through lockstep deploy)}
: "${LOCKSTEP_VERSION_ID:?LOCKSTEP_VERSION_ID is not set: run me through lockstep deploy}"
: "${DEPLOY_TIME_UTC:?DEPLOY_TIME_UTC is not set: run me through lockstep deploy}"

mkdir -p "$dir/releases"
release="releases/$LOCKSTEP_VERSION_ID.env"
printf 'LOCKSTEP_VERSION_ID=%s\nDEPLOY_TIME_UTC=%s\n' \
  "$LOCKSTEP_VERSION_ID" "$DEPLOY_TIME_UTC" >"$dir/$release"
# Switch the link atomically: a worker starting now sees the old or the new release, whole.
ln -s "$release" "$dir/current.env.new"
mv -f "$dir/current.env.new" "$dir/current.env"
echo "deploy.sh: shipped release $(printf %.8s "$LOCKSTEP_VERSION_ID") (deploy time $DEPLOY_TIME_UTC) to $dir/current.env" >&2
