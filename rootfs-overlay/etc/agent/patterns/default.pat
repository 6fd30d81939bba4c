# The default pattern library of the agent (channel 4).
#
# Written against the event vocabulary of docs/events.md, in the language of
# docs/patterns.md.  Compiled and signed into default.bundle by
#   agent-patterns build default.pat -o default.bundle --version N
#   agent-patterns sign default.bundle --key KEY
# A vendor's fleet replaces it with newer signed bundles (higher versions).
#
# The response is what the correlation service is asked to do to the cell the
# chain began in (record: only the alert); tag master marks attacks on the agent
# itself, after which the master re-creates itself from the pristine image.


# A file dropped by one cell and executed or loaded by another.
#
# Cells whose manifests name the same data directory share files.  A program or
# library written there by one cell and then run (or mapped as a library) by
# another is how a compromised cell reaches a neighbour that trusts the
# directory.  Channel 1 sees the write (file-written, with the content's hash)
# and the run of a file that is not sealed in the second cell's image (refused,
# or allowed in report-only mode); the hash joins them whatever path each cell
# sees the file at.
pattern shared-drop-exec
  about a program written by one cell is run or loaded by another
  severity alert
  response isolate
  tag spread
  within 1h
  cells distinct
  step drop: exec/file-written source != null
  step run: exec/exec-denied|exec-unverified same hash
end


# One cell scanning while another opens the listener that is then reached.
#
# A scan alone is noise.  A scanner that then connects to a port another cell
# began listening on after the scan started is two cells working together: one
# planted a backdoor listener, the other found and used it (or drives it).
# Cancelled when the listening cell goes away.
pattern scan-listen-reach
  about a scanning cell reaches a listener another cell opened meanwhile
  severity alert
  response isolate
  tag net
  within 10m
  step scan: net/scan
  step open: net/listen cell != scan.cell
  step reach: net/flow cell == scan.cell and peer_cell == open.cell
    and dport == open.port
  until lifecycle/destroyed cell == open.cell
end


# A privileged operation in one cell driven by requests from another.
#
# A cell granted a privileged operation (the master performs it when the call
# traps) can be steered by a neighbour that sends it requests: a confused
# deputy.  Requests from one cell, then the other asking for a privileged call
# its manifest does not grant, within seconds: the requests try to widen what
# the neighbour may do.
pattern privileged-by-proxy
  about requests from one cell make another try privileged calls it may not make
  severity alert
  response isolate
  tag deputy
  within 10s
  step ask: net/flow peer_cell != null
  step act: syscall/trap|denied verdict == denied and cell == ask.peer_cell
end


# The same when the operation is granted and changes the host (the clock, the
# host name, sysctls, mounts): recorded with who asked, since the change
# outlives the request.
pattern host-change-by-proxy
  about requests from one cell lead another to change the host
  severity notice
  response record
  tag deputy
  within 10s
  step ask: net/flow peer_cell != null
  step act: syscall/trap verdict == allowed and cell == ask.peer_cell
    and op in {set_time, set_hostname, mount_usb, reboot, sysctl_net}
  step change: host/clock-set|sysctl|mount by == act.cell
end


# Resource abuse by several cells together.
#
# One cell under pressure is the tuner's business.  Three or more cells under
# pressure on the same resource within a minute is how a group of cells starves
# the box while each stays within its own limits - or a box too small for what
# it runs, which the vendor should know as well.
pattern pressure-from-many
  about three or more cells under pressure on one resource within a minute
  severity notice
  response record
  tag resources
  step hot: tuner/pressure
  count 3 distinct cell within 1m per resource
end


# Repeated denied escapes across cells.
#
# A refused privileged call now and then is a program probing what it may do.
# Escape calls refused in three or more cells within five minutes is a campaign:
# one exploit tried everywhere, or spreading from cell to cell.
pattern escapes-across-cells
  about escape calls refused in three or more cells
  severity alert
  response freeze
  tag escape
  step try: syscall/trap|denied|killed verdict != allowed
    and syscall in {mount, umount2, pivot_root, unshare, setns, ptrace, bpf,
                    init_module, finit_module, kexec_load, open_by_handle_at,
                    keyctl, add_key, userfaultfd, perf_event_open, chroot}
  count 3 distinct cell within 5m
end


# Code that hides from exec protection in several cells.
#
# A program run from an anonymous memory file never touches a mount, so fanotify
# cannot see its exec; cells not granted op memfd are refused memfd_create for that
# reason (syscall/denied).  Memory files asked for in two or more such cells within
# ten minutes is one loader tried everywhere (a benign program that needs them is
# granted op memfd by its manifest and never shows here).
pattern memfd-across-cells
  about memory-only program files tried in two or more cells
  severity alert
  response freeze
  tag escape
  step run: syscall/denied syscall == memfd_create
  count 2 distinct cell within 10m
end


# Attacks on the agent itself: its files.
#
# A file of the installed agent or of its configuration changed on disk.  The
# master cannot trust its own code any more: it re-creates itself from the
# pristine image.
pattern master-files-changed
  about a file of the agent changed on disk
  severity alert
  response record
  tag master
  step changed: agent/integrity
end


# Attacks on the agent itself: its processes.
#
# A signal to agentd from anything but init.  The cell of the sender (if any) is
# stopped, and the master re-creates itself.
pattern master-signalled
  about a process signalled the agent
  severity alert
  response stop
  tag master
  step sig: agent/signal sender_pid != 1
end


# Attacks on the agent itself: its control socket.
#
# Five requests refused by policy from one user within a minute: someone is
# trying what the control socket lets them do.
pattern master-control-probing
  about repeated refused requests on the agent's control socket
  severity alert
  response stop
  tag master
  step refused: agent/control-denied
  count 5 within 1m per uid
end


# Attacks on the agent itself, as a chain: a cell refused on the control socket
# that then signals the agent or changes its files.
pattern master-probe-then-tamper
  about a cell refused on the control socket then tampers with the agent
  severity alert
  response stop
  tag master
  within 10m
  cells same
  step probe: agent/control-denied
  step tamper: agent/signal|integrity
end
