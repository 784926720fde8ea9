/* The release fault_point: nothing (include/patchsweep/fault.h).  Alone in
 * its file so that the test build's tests/fault/fault_inject.c, linked before
 * the library, replaces it. */
#include "fault.h"

bool fault_point(const char *site)
{
    (void)site;
    return false;
}
