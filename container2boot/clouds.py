"""What a machine needs to be usable on each cloud `--cloud` writes a disk for, checked on the image before the
slow steps: a cloud starts the disk where nobody sits at its console, so cloud-init (reading that cloud's
metadata), an SSH server and a DHCP client are what let its owner in. Missing parts are warnings, not errors: a
user may add them another way."""

from dataclasses import dataclass

from container2boot.rootfs import FAMILIES, Report


@dataclass(frozen=True)
class Cloud:
    title: str
    datasources: tuple[str, ...]  # cloud-init datasources that read this cloud's metadata, any one will do


CLOUDS: dict[str, Cloud] = {
    # Droplets from custom images get a config drive besides the metadata service.
    "digitalocean": Cloud("DigitalOcean", ("DigitalOcean", "ConfigDrive")),
    "openstack": Cloud("OpenStack", ("OpenStack", "ConfigDrive")),
    "gce": Cloud("Google Compute Engine", ("GCE",)),
    "azure": Cloud("Azure", ("Azure",)),
}
# What provides each need, by distribution family (as rootfs.PACKAGES).
PACKAGES: dict[str, dict[str, str]] = {
    "cloud-init": dict.fromkeys(FAMILIES, "cloud-init"),
    "sshd": {"debian": "openssh-server", "ubuntu": "openssh-server", "fedora": "openssh-server",
             "rhel": "openssh-server", "arch": "openssh", "alpine": "openssh-server"},
    "network": {"debian": "ifupdown isc-dhcp-client", "ubuntu": "netplan.io", "fedora": "NetworkManager",
                "rhel": "NetworkManager", "arch": "dhcpcd", "alpine": "ifupdown-ng"},
}
AZURE_AGENT = ("usr/sbin/waagent", "usr/bin/waagent")
AZURE_AGENT_PACKAGES = {"debian": "waagent", "ubuntu": "walinuxagent", "fedora": "WALinuxAgent",
                        "rhel": "WALinuxAgent"}


def cloud_warnings(report: Report, cloud: str) -> list[str]:
    """What the image lacks on `cloud`, each with the packages (or the setting) that add it; [] when nothing."""
    target = CLOUDS[cloud]
    warnings = []
    if not report.cloud_init:
        warnings.append(f"{report.name} has no cloud-init, which sets up SSH keys, users and the hostname from "
                        f"{target.title}'s metadata (its datasource {target.datasources[0]}): "
                        f"{packages(report, 'cloud-init')}")
    elif report.cloud_datasources is not None and not _allows(report.cloud_datasources, target.datasources):
        warnings.append(f"cloud-init in {report.name} only tries the datasources "
                        f"{', '.join(report.cloud_datasources) or 'none'} (datasource_list in /etc/cloud/cloud.cfg "
                        f"or cloud.cfg.d/*.cfg), so it ignores {target.title}'s metadata: add "
                        f"{' or '.join(target.datasources)} to datasource_list")
    if not report.sshd:
        warnings.append(f"{report.name} has no SSH server, so nobody can log in to it over {target.title}'s "
                        f"network: {packages(report, 'sshd')}")
    if not report.dhcp_client:
        warnings.append(f"{report.name} has no DHCP client or network manager, so it gets no address on "
                        f"{target.title}'s network: {packages(report, 'network')}")
    if cloud == "azure" and not any(report.tree.is_file(path) for path in AZURE_AGENT):
        agent = AZURE_AGENT_PACKAGES.get(report.family)
        warnings.append(f"hint: {report.name} has no Azure Linux agent; cloud-init provisions the VM without it, "
                        f"but Azure's VM extensions need it: add {f'`{agent}`' if agent else 'WALinuxAgent'} if "
                        "you use them")
    return warnings


def _allows(listed: tuple[str, ...], wanted: tuple[str, ...]) -> bool:
    return bool({name.lower() for name in listed} & {name.lower() for name in wanted})


def packages(report: Report, need: str) -> str:
    """'add `pkg` to the image' for this family, or every family's names when the family is unknown."""
    if report.family in FAMILIES:
        return f"add `{PACKAGES[need][report.family]}` to the image (e.g. in its Containerfile)"
    names = ", ".join(f"`{PACKAGES[need][f]}` ({FAMILIES[f]})" for f in ("debian", "fedora", "arch"))
    return f"add {names} to the image"
