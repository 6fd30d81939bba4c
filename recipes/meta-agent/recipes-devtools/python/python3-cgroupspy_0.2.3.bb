SUMMARY = "Python library for managing cgroups (v1)"
DESCRIPTION = "cgroupspy exposes the cgroup v1 hierarchy as a Python tree; \
               agentd uses it as its backend on kernels without the cgroup v2 \
               hierarchy."
HOMEPAGE = "https://github.com/cloudsigma/cgroupspy"
BUGTRACKER = "https://github.com/cloudsigma/cgroupspy/issues"
SECTION = "devel/python"
CVE_PRODUCT = "cgroupspy"
LICENSE = "BSD-3-Clause"
LIC_FILES_CHKSUM = "file://LICENSE;md5=490066fd7cfd35eabc44075bb71627d4"

SRC_URI[sha256sum] = "8ee941c7ab9234a0b17a81b0b26487f7f1031f78b7a24cdd8eed1b5fa5970496"

inherit pypi setuptools3

RDEPENDS:${PN} += "python3-core python3-logging"

BBCLASSEXTEND = "native nativesdk"
