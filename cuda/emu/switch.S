/* fk_emu_switch(void** save_sp, void* load_sp): the fiber context switch (x86-64 System V).
 * Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
 * stores the stack pointer in *save_sp, loads load_sp and restores the same from there.
 * A fresh fiber's stack is laid out by runtime.cpp to "return" into its entry function. */
    .text
    .globl fk_emu_switch
    .type fk_emu_switch, @function
fk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fk_emu_switch, .-fk_emu_switch
    .section .note.GNU-stack,"",@progbits
