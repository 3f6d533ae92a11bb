"""The kernel command line: checked against what boots before any slow step, and written safely into the boot
loaders' configs.

What breaks a boot, measured: a newline in grub.cfg starts a new GRUB command (a whole menu entry can be injected);
the kernel copies at most 2047 bytes of its command line; it hands unknown `name=value` arguments to init as its
environment and unknown words as its arguments, and panics ("Too many boot env vars") beyond 32 of either. Quotes
and backslashes are rewritten differently by different GRUB releases, so an argument is one plain word: printable
ASCII without quotes or backslashes. Each word is then single-quoted for GRUB's script language, where `$`, `;`, `{`
and `#` mean something; syslinux takes its APPEND line literally.
"""

import re

from container2boot.errors import C2BootError

MAX_BYTES = 2047  # x86's COMMAND_LINE_SIZE is 2048, its terminating NUL included
MAX_INIT_ENVS = 32 - 2  # the kernel's limit, less HOME=/ and TERM=linux which it sets itself
MAX_INIT_ARGS = 32 - 1  # the kernel's limit, less init's own name
ROOM_FOR_DEFAULTS = 320  # bytes container2boot's own arguments (root, live image, console, network) may take
NOT_ALLOWED = re.compile(r"[^\x20-\x7e]|[\"'\\]")
# Parameters the kernel itself consumes (the rest without a dot in their name go to init). Arguments with a dot
# (module.param, rd.*, systemd.*) never reach init.
KERNEL_PARAMETERS = frozenset((
    "acpi", "amd_iommu", "apparmor", "audit", "cgroup_disable", "cgroup_enable", "cgroup_no_v1", "clocksource",
    "console", "crashkernel", "debug", "dyndbg", "default_hugepagesz", "earlycon", "earlyprintk", "efi", "enforcing",
    "fbcon",
    "hugepages", "hugepagesz", "ignore_loglevel", "init", "initcall_debug", "init_on_alloc", "init_on_free",
    "intel_iommu", "iommu", "ip", "isolcpus", "kaslr", "lockdown", "log_buf_len", "loglevel", "lsm", "maxcpus",
    "mem", "memmap", "mitigations", "module_blacklist", "nfsroot", "nofb", "nohz_full", "nokaslr", "nolapic",
    "noapic", "nomodeset", "noresume", "nosmp", "nopti", "nr_cpus", "panic", "panic_on_oops", "pci", "pti", "quiet",
    "rcu_nocbs", "rdinit", "reboot", "resume", "resume_offset", "ro", "root", "rootdelay", "rootflags", "rootfstype",
    "rootwait", "rw", "selinux", "security", "spectre_v2", "transparent_hugepage", "tsc", "vga", "video",
))


def split(cmdline: str) -> list[str]:
    return cmdline.split()


def check(cmdline: str, what: str, reserved: int = 0) -> None:
    """Fail with one line when `cmdline` (plus `reserved` bytes of other arguments) could not boot as meant."""
    if bad := NOT_ALLOWED.search(cmdline):
        char = {"\n": "a newline", "\t": "a tab", "\r": "a carriage return"}.get(bad.group(), repr(bad.group()))
        raise C2BootError(f"{what} contains {char}: kernel arguments are words of printable ASCII separated by "
                          "spaces, without quotes or backslashes (boot loaders rewrite those)")
    length = len(" ".join(split(cmdline))) + reserved
    if length > MAX_BYTES:
        raise C2BootError(f"{what} is too long: the kernel command line would be {length} bytes, and the kernel "
                          f"keeps only {MAX_BYTES}: shorten it")
    words = split(cmdline)
    for_init = words[words.index("--") + 1:] if "--" in words else []
    to_init = [w for w in words[:len(words) - len(for_init) - (1 if for_init else 0)]
               if "." not in w.partition("=")[0] and w.partition("=")[0] not in KERNEL_PARAMETERS]
    envs = [w for w in to_init if "=" in w]
    args = [w for w in to_init if "=" not in w] + for_init
    for found, limit, kind in ((envs, MAX_INIT_ENVS, "name=value arguments"), (args, MAX_INIT_ARGS, "words")):
        if len(found) > limit:
            raise C2BootError(f"{what} has {len(found)} {kind} the kernel does not use itself (e.g. {found[0]}): it "
                              f"passes them to init and panics over {limit}; use fewer, or module.name=value forms")


def grub_words(cmdline: str) -> str:
    """The arguments as GRUB script words: each single-quoted, so GRUB passes it to the kernel unchanged."""
    return " ".join(f"'{word}'" for word in split(cmdline))
