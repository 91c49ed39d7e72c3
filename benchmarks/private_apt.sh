# Sourced by benchmarks/arm/setup.sh and benchmarks/debian13/setup.sh: a private APT configuration under one
# directory, so `apt-get download` / `apt-get source` read their own lists and the host's dpkg stays untouched.
#
#   write_apt_conf DIR ARCH "ARCH1 ARCH2 ..."     → DIR/apt.conf (+ an empty DIR/status); DIR/sources.list is the caller's
write_apt_conf() {
    local dir=$1 arch=$2 arches="" a
    for a in $3; do arches+="\"$a\"; "; done
    : >"$dir/status"
    mkdir -p "$dir/cache"
    cat >"$dir/apt.conf" <<CONF
APT::Architecture "$arch";
APT::Architectures { $arches};
Dir::Etc::SourceList "$dir/sources.list";
Dir::Etc::SourceParts "$dir/parts";
Dir::Etc::PreferencesParts "$dir/prefs";
Dir::State::Lists "$dir/lists";
Dir::State::status "$dir/status";
Dir::Cache "$dir/cache";
Dir::Cache::archives "$dir/archives";
APT::Sandbox::User "root";
Acquire::Languages "none";
Debug::NoLocking "true";
#clear APT::Update::Post-Invoke-Success;
#clear APT::Update::Post-Invoke;
CONF
}
