/*
 * The guest's `cpl3` check as a host process: the same `dec; jnz` loop, bracketed by two lines on stdout
 * so that the benchmark times it from outside exactly as it times the loop in the VM.
 * Built by bench/compute.py with gcc at benchmark time.
 */
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    unsigned long loops = argc > 1 ? strtoul(argv[1], NULL, 0) : 0;
    if (write(1, "START\n", 6) != 6)
        return 1;
    if (loops)
        __asm__ volatile("1: dec %0; jnz 1b" : "+r"(loops));
    if (write(1, "DONE\n", 5) != 5)
        return 1;
    return 0;
}
