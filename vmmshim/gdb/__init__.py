"""The GDB stub (bhyve's ``usr.sbin/bhyve/gdb.c``, ``-G``): gdb's remote serial protocol over TCP.

``rsp.py`` frames packets, ``target.py`` reads and writes registers, memory and breakpoints through the ops API,
``server.py`` serves one debugger and stops and resumes the vCPUs.

Not supported: non-stop mode, more than one debugger at a time.
"""
