"""One exception type per failure an operator or a client can act on.

Every message is one line: what is wrong, then what to do about it.  The CLI
prints ``str(err)`` of a :class:`ProcwatchError` and exits 1; any other
exception is a bug and keeps its traceback.
"""


class ProcwatchError(Exception):
    """Base class of every error procwatch raises on purpose."""
    __module__ = "procwatch"

    def __reduce__(self):
        return (self.__class__, self.args)


class SegmentMissing(ProcwatchError):
    """No slot table exists at the key: the service has not created it."""
    __module__ = "procwatch"

    def __init__(self, key):
        self.key = key
        super().__init__(key)

    def __str__(self):
        return (f"no slot table at key {self.key:#010x}: start the service "
                f"('procwatch serve' or 'systemctl start procwatch')")


class SegmentPermissionError(ProcwatchError):
    """The table exists but this user may not attach or lock it."""
    __module__ = "procwatch"

    def __init__(self, key, mode=None, gid=None):
        self.key, self.mode, self.gid = key, mode, gid
        super().__init__(key, mode, gid)

    def __str__(self):
        import grp
        import os
        where = ""
        if self.mode is not None:
            try:
                group = grp.getgrgid(self.gid).gr_name
            except (KeyError, TypeError):
                group = str(self.gid)
            where = f" (mode {self.mode:04o}, group {group})"
            fix = f"add user uid {os.getuid()} to group '{group}' or run as root"
        else:
            fix = "run as root or as a member of the table's group"
        return f"cannot attach slot table key {self.key:#010x}{where}: {fix}"


class AccessDenied(ProcwatchError):
    """register_pid(pid=...) named a process the caller may not signal itself."""
    __module__ = "procwatch"

    def __init__(self, pid, owner_uid=None):
        self.pid, self.owner_uid = pid, owner_uid
        super().__init__(pid, owner_uid)

    def __str__(self):
        import os
        owner = f"uid {self.owner_uid}" if self.owner_uid is not None else "another user"
        return (f"cannot register PID {self.pid}: it belongs to {owner}, and this process "
                f"(uid {os.getuid()}) may not signal it; register it from that process itself, or as root")


class SegmentCorrupt(ProcwatchError):
    """The segment at the key is not a procwatch table of this layout."""
    __module__ = "procwatch"

    def __init__(self, key, why):
        self.key, self.why = key, why
        super().__init__(key, why)

    def __str__(self):
        return (f"segment at key {self.key:#010x} is not a procwatch table ({self.why}): "
                f"remove it with 'ipcrm -M {self.key:#010x}' once no process uses it")


class TableFull(ProcwatchError):
    """Every slot holds a live registration."""
    __module__ = "procwatch"

    def __init__(self, key, slots):
        self.key, self.slots = key, slots
        super().__init__(key, slots)

    def __str__(self):
        return (f"slot table key {self.key:#010x} is full ({self.slots} live registrations): "
                f"restart the service with more --slots after removing the segment, "
                f"or unregister unused clients")


class NameInUse(ProcwatchError):
    """Another live process is registered under this name."""
    __module__ = "procwatch"

    def __init__(self, name, pid):
        self.name, self.pid = name, pid
        super().__init__(name, pid)

    def __str__(self):
        return (f"name {self.name!r} is registered by live PID {self.pid}: "
                f"pick another name or stop that process first")


class NameNotFound(ProcwatchError):
    """No slot carries this name."""
    __module__ = "procwatch"

    def __init__(self, name, key):
        self.name, self.key = name, key
        super().__init__(name, key)

    def __str__(self):
        return (f"no process named {self.name!r} in slot table key {self.key:#010x}: "
                f"see 'procwatch status' for the registered names")


class NameAmbiguous(ProcwatchError):
    """Two or more live slots carry one name: a group member wrote one by hand.

    Honest registrations never make this (a name has one slot), so procwatch
    will not guess which is real: a failover script acting on the forged one
    would start a backup while the real process lives (issue 13).
    """
    __module__ = "procwatch"

    def __init__(self, name, key, holders):
        self.name, self.key, self.holders = name, key, tuple(holders)
        super().__init__(name, key, self.holders)

    def __str__(self):
        held = ", ".join(f"slot {slot}: pid {pid}" for slot, pid in self.holders)
        return (f"name {self.name!r} is held by {len(self.holders)} live slots of table key "
                f"{self.key:#010x} ({held}); only one can be real, and procwatch will not guess: "
                f"a member of the table's group wrote the other; see the service's log")


class TableBusy(ProcwatchError):
    """The table's semaphore could not be taken in time."""
    __module__ = "procwatch"

    def __init__(self, key, holder, timeout, holder_gone=False):
        self.key, self.holder, self.timeout, self.holder_gone = key, holder, timeout, holder_gone
        super().__init__(key, holder, timeout, holder_gone)

    def __str__(self):
        if self.holder_gone:
            # Issue 13: taken without SEM_UNDO by a process that then exited.
            return (f"slot table key {self.key:#010x} stayed locked for {self.timeout:g} s; "
                    f"PID {self.holder or '?'}, which took it last, has exited without giving it back: "
                    f"a running procwatch service puts it back within a few seconds, so try again")
        return (f"slot table key {self.key:#010x} stayed locked for {self.timeout:g} s "
                f"(last locked by PID {self.holder}): check that process; "
                f"the lock is released when it exits")


class ServiceRunning(ProcwatchError):
    """Another procwatch service already serves this key."""
    __module__ = "procwatch"

    def __init__(self, key, pid):
        self.key, self.pid = key, pid
        super().__init__(key, pid)

    def __str__(self):
        return (f"procwatch PID {self.pid} already serves key {self.key:#010x}: "
                f"stop it first, or use another --key")


class ConnectorUnavailable(ProcwatchError):
    """The proc connector cannot be used by this process."""
    __module__ = "procwatch"

    def __init__(self, why, fix):
        self.why, self.fix = why, fix
        super().__init__(why, fix)

    def __str__(self):
        return f"proc connector unavailable: {self.why}: {self.fix}"


class UsageError(ProcwatchError):
    """A command was given a value it cannot use (one argparse could not see): exit status 2."""
    __module__ = "procwatch"
